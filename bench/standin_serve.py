"""``python -m bench.standin_serve [--table FILE] [--device-decode-ms MS] serve [--checkpoint DIR] [--log-level L]
[--host H] [--port N]``: ``patchlife serve`` with the stand-in device of :mod:`bench.standin` as its engine
(benches only; see there for why this way). Settings come from ``PATCHLIFE_*`` as for ``patchlife serve``.

Kept free of heavy imports: the API processes are spawned, and spawning imports this module in each
of them (never running ``main``); they run the production code unchanged. It parses ``serve``'s few
options itself (bench/ does not import the command line, tests/test_layers.py).
"""

from __future__ import annotations

import argparse
from pathlib import Path

LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.standin_serve", description=__doc__.split("\n")[0])
    p.add_argument("--table", type=Path, help="measured device times, JSON (bench/standin.py: Table; default: "
                                              "bench/tables/h200_deit_small.json)")
    p.add_argument("--device-decode-ms", type=float, help="the model process decodes JPEGs on the stand-in device, "
                                                           "this many ms per image (bench/standin.py: StandInDecoder), "
                                                           "as beside a GPU; default: the API processes decode them")
    p.add_argument("command", choices=["serve"], help="what to run: patchlife serve")
    p.add_argument("--host", help="bind address (default: PATCHLIFE_HOST)")
    p.add_argument("--port", type=int, help="bind port (default: PATCHLIFE_PORT)")
    p.add_argument("--checkpoint", type=Path, help="checkpoint directory (default: PATCHLIFE_CHECKPOINT)")
    p.add_argument("--log-level", default="info", choices=LOG_LEVELS, help="uvicorn's and patchlife's log level")
    args = p.parse_args(argv)
    from service.serve import run

    from .standin import DEFAULT_TABLE, Table, install

    try:
        if args.device_decode_ms is not None and not args.device_decode_ms >= 0:
            raise ValueError("--device-decode-ms: >= 0")
        install(Table.load(args.table or DEFAULT_TABLE), args.device_decode_ms)
    except ValueError as exc:
        p.error(str(exc))
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
