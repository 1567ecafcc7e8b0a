"""``python -m bench.standin_serve [--table FILE] serve [options]``: ``patchlife serve`` with the
stand-in device of :mod:`bench.standin` as its engine (benches only; see there for why this way).

Kept free of heavy imports: the API processes are spawned, and spawning imports this module in each
of them (never running ``main``); they use the production code unchanged.
"""

from __future__ import annotations

import argparse
from pathlib import Path

TABLE_HELP = "measured device times, JSON (bench/standin.py: Table; default: the H200 deit_small table)"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.standin_serve", description=__doc__.split("\n")[0],
                                epilog="the remaining arguments are patchlife's: serve [options]")
    p.add_argument("--table", type=Path, help=TABLE_HELP)
    args, rest = p.parse_known_args(argv)
    if not rest or rest[0] != "serve":
        p.error("give the patchlife command to run: serve [options]")
    from cli.main import main as patchlife

    from .standin import DEFAULT_TABLE, Table, install

    try:
        install(Table.load(args.table or DEFAULT_TABLE))
    except ValueError as exc:
        p.error(str(exc))
    return patchlife(rest)


if __name__ == "__main__":
    raise SystemExit(main())
