"""``python -m bench.standin_host --socket PATH --metrics-dir DIR [--table FILE]``: the model process of
``patchlife serve`` alone, its engine the stand-in device (:mod:`bench.standin`), serving the wire
protocol (:mod:`service.transport.wire`) on a Unix socket, with no API process and no HTTP port.

It is what ``service/processes.py``'s model process runs, less the supervision of API processes: the
engine, :class:`~service.runtime.local.LocalModel` (warm-up, the batching worker, its metrics in the
multiprocess directory ``DIR``, as ``serve`` keeps them) and :class:`~service.transport.host.ModelHost`
(its heartbeat sampling the metrics). So a client that speaks the wire itself (:mod:`bench.model_cpu`)
can load the model process at rates the API processes of this machine could never send, and its CPU
is the model process's own. Settings come from ``PATCHLIFE_*`` as for ``patchlife serve``
(``PATCHLIFE_CHECKPOINT`` names the checkpoint whose geometry the stand-in takes). SIGTERM or SIGINT:
drain and exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from pathlib import Path

from .standin import DEFAULT_TABLE, StandInEngine, Table


async def serve_model(socket_path: Path, table: Table) -> None:
    from service.metrics import Metrics
    from service.runtime.local import LocalModel
    from service.settings import Settings
    from service.transport.host import ModelHost

    settings = Settings()
    engine = StandInEngine.from_table(table, settings)
    metrics = Metrics()
    model = LocalModel(settings, metrics, engine)
    card = await model.open()
    host = ModelHost(model, card, heartbeat=metrics.sample, max_frame=settings.max_request_bytes + (1 << 20))
    await host.start(socket_path)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await model.start()
    finally:
        host.push_status()  # READY (or FAILED, with the reason): the client waits for it
    await stop.wait()
    model.begin_drain()
    await model.stop(grace_s=1.0)
    await host.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.standin_host", description=__doc__.split("\n")[0])
    p.add_argument("--socket", type=Path, required=True, help="the Unix socket to listen on")
    p.add_argument("--metrics-dir", type=Path, required=True, help="prometheus_client multiprocess directory")
    p.add_argument("--table", type=Path, default=DEFAULT_TABLE, help="measured device times (bench/standin.py)")
    args = p.parse_args(argv)
    from service.metrics_dir import enable_multiprocess  # before service.metrics is imported, as serve does

    enable_multiprocess(args.metrics_dir, fresh=True)
    asyncio.run(serve_model(args.socket, Table.load(args.table)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
