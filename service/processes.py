"""``patchlife serve`` with API processes: this process is the model process; it starts the API processes.

    model process (this one)                      API process x PATCHLIFE_API_PROCESSES
    engine, batching worker, the GPU       <-->   uvicorn + FastAPI on the shared port: HTTP, limits,
    ModelHost on a Unix socket                    decoding, preprocessing; RemoteModel: pixels into
    metrics of the worker                         shared-memory slots, descriptors over the socket

The settings are parsed and the checkpoint loaded once, here, before the port is bound, so a bad
checkpoint ends the command with its message and no port ever opens. The listening socket is bound
here and inherited by every API process (the kernel spreads connections over them); gRPC listens in
each API process with SO_REUSEPORT. Metrics of every process go to one prometheus_client multiprocess
directory, so any API process's ``/metrics`` shows the whole service.

Supervision: an API process that dies is replaced (after too many deaths in a row, ``serve`` gives
up and exits 1). If this process dies, every API process loses its connection: it answers 503 from
then on and exits, and ``serve``'s exit status is that of this process (non-zero), so Kubernetes
restarts the pod (docs/ops.md). If this process stalls (stopped, deadlocked), the API processes notice
the silence of its heartbeat: /readyz 503 past ``PATCHLIFE_MODEL_STALL_S``, and past
``PATCHLIFE_MODEL_STALL_EXIT_S`` they kill it (a hung process cannot end itself), with the same
ending. The pixel slots are one pool this process creates and every API process takes from
(``service/transport/slots.py``); the work directory and the pool are removed at the end, by the API
processes if this one was killed, or by the next start (``service/leftovers.py``).
SIGTERM/SIGINT: forwarded to the API processes, which drain as the
single-process service does (``service/frontend/http_server.py``) while the model keeps serving them; when they have
exited the worker stops and ``serve`` exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import dataclasses
import logging
import math
import multiprocessing
import os
import secrets
import shutil
import signal
import socket
import sys
import time
from dataclasses import dataclass
from multiprocessing import shared_memory
from multiprocessing.process import BaseProcess
from pathlib import Path

from .leftovers import dead, make_workdir, remove_own, remove_stale, shm_name
from .logs import configure_logging
from .metrics_dir import cleanup_multiprocess, enable_multiprocess, mark_process_dead, multiprocess_dir
from .settings import Settings
from .transport.slots import SlotPool, shm_free_bytes

log = logging.getLogger("patchlife.serve")
MAX_QUICK_DEATHS = 5        # API processes that die within QUICK_DEATH_S of their start, in a row: give up
QUICK_DEATH_S = 10.0
RESPAWN_DELAY_S = 0.5
EXIT_MARGIN_S = 10.0        # beyond the API processes' own drain before they are killed
LOCK_NAME = "slots.lock"    # in the work directory: the pool's allocation lock


@dataclass(frozen=True)
class ApiSpec:
    """What an API process needs, pickled to it at spawn."""

    index: int
    settings: Settings
    ipc_path: Path
    metrics_dir: Path | None
    slots: int
    log_level: str
    model_pid: int = 0  # the model process: the only process an API process may kill (a stall, see api_main)
    pool_name: str | None = None  # the shared pixel pool (service/transport/slots.py); its lock is in ipc_path's folder


def bind(host: str, port: int, listen: bool = True) -> socket.socket:
    """The shared listening socket (as uvicorn binds it), inheritable by the API processes."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"port {port}: {exc.strerror}") from None
    if listen:
        sock.listen(2048)
        sock.set_inheritable(True)
    return sock


def shm_problem(pool_bytes: int) -> str | None:
    """Why the pixel slots cannot fit in /dev/shm (None when they can): a slot written past the end of
    a full tmpfs kills its API process with SIGBUS, so this is refused at start-up instead."""
    free = shm_free_bytes()
    if free is None or pool_bytes <= free:
        return None
    return (f"the pixel slots need {pool_bytes / 2**20:.0f} MiB of shared memory and /dev/shm has "
            f"{free / 2**20:.0f} MiB free: mount a larger /dev/shm (docker: --shm-size, Kubernetes: an emptyDir "
            "with medium Memory, see docs/ops.md) or lower PATCHLIFE_PIXEL_SLOTS / PATCHLIFE_API_PROCESSES")


def run(args: argparse.Namespace, settings: Settings, processes: int) -> int:
    """The model process: load, bind, start the API processes, serve them until SIGTERM."""
    from .runtime.engine import Engine  # after the metrics directory is chosen: see metrics_mod

    remove_stale()  # what a killed predecessor left in /tmp and /dev/shm (only the dead's)
    workdir = make_workdir()  # 0700: the socket and metrics are ours alone
    try:
        # one directory for every process's metrics (PROMETHEUS_MULTIPROC_DIR if set, emptied first)
        metrics_dir = multiprocess_dir() or workdir / "metrics"
        metrics_dir.mkdir(parents=True, exist_ok=True)
        enable_multiprocess(metrics_dir, fresh=True)
        configure_logging(args.log_level, settings.log_format, "model")
        try:
            engine = Engine.from_settings(settings)
        except (FileNotFoundError, ValueError, RuntimeError, OSError) as exc:
            print(f"patchlife serve: {exc}", file=sys.stderr)
            return 1
        slots, shape = settings.pool_slots(processes), engine.card().input_shape
        problem = shm_problem(slots * math.prod(shape))
        if problem:
            print(f"patchlife serve: {problem}", file=sys.stderr)
            return 1
        pool = SlotPool(slots, shape, lock_path=workdir / LOCK_NAME,
                        new_name=shm_name(os.getpid(), secrets.token_hex(4)))
        try:
            sock = bind(settings.host, settings.port)
            if settings.grpc_port:  # the API processes share it with SO_REUSEPORT: check nobody else has it
                bind(settings.host, settings.grpc_port, listen=False).close()
        except OSError as exc:
            print(f"patchlife serve: cannot listen on {settings.host}: {exc}", file=sys.stderr)
            return 1
        spec = ApiSpec(0, settings, workdir / "model.sock", metrics_dir, slots, args.log_level, os.getpid(),
                       pool.name)
        try:
            return asyncio.run(_model_process(engine, settings, spec, sock, processes, pool))
        finally:
            pool.close(unlink=True)
    finally:
        if multiprocess_dir() is not None:
            cleanup_multiprocess(multiprocess_dir())  # type: ignore[arg-type]
        shutil.rmtree(workdir, ignore_errors=True)


class _Supervisor:
    """Starts, watches and replaces the API processes; forwards the shutdown signal to them."""

    def __init__(self, spec: ApiSpec, sock: socket.socket, count: int) -> None:
        self.spec, self.sock, self.count = spec, sock, count
        self.context = multiprocessing.get_context("spawn")
        self.procs: dict[int, tuple[BaseProcess, float]] = {}
        self.stopping = False
        self.quick_deaths = 0

    def spawn(self, index: int) -> None:
        spec = dataclasses.replace(self.spec, index=index)
        proc = self.context.Process(target=api_main, args=(spec, self.sock), name=f"patchlife-api-{index}",
                                    daemon=False)
        proc.start()
        self.procs[index] = (proc, time.monotonic())

    def start_all(self) -> None:
        for i in range(1, self.count + 1):
            self.spawn(i)
        log.info("starting %s", _api_processes(self.count))

    async def watch(self) -> int | None:
        """Replace API processes that die; returns an exit status when serve must give up."""
        while not self.stopping:
            for index, (proc, started) in list(self.procs.items()):
                if proc.is_alive():
                    continue
                code = proc.exitcode
                _mark_dead(proc.pid)
                if self.stopping:
                    break
                quick = time.monotonic() - started < QUICK_DEATH_S
                self.quick_deaths = self.quick_deaths + 1 if quick else 0
                log.error("API process %d (pid %s) exited with status %s; %s", index, proc.pid, code,
                          "giving up" if self.quick_deaths >= MAX_QUICK_DEATHS else "starting another")
                if self.quick_deaths >= MAX_QUICK_DEATHS:
                    return 1
                await asyncio.sleep(RESPAWN_DELAY_S)
                if not self.stopping:
                    try:
                        self.spawn(index)
                    except Exception:  # counted as a quick death when the loop comes round to it again
                        log.exception("could not start API process %d", index)
                        self.procs[index] = (proc, time.monotonic())
            alive = [proc for proc, _ in self.procs.values() if proc.is_alive()]
            if alive and len(alive) == len(self.procs):  # else a death is still to be handled
                await _until_one_exits(alive, None)
        return None

    def signal_all(self, sig: int) -> None:
        for proc, _ in self.procs.values():
            if proc.is_alive() and proc.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, sig)

    async def wait_all(self, limit_s: float) -> None:
        end = time.monotonic() + limit_s
        while (alive := [p for p, _ in self.procs.values() if p.is_alive()]) and time.monotonic() < end:
            await _until_one_exits(alive, end - time.monotonic())
        for proc, _ in self.procs.values():
            if proc.is_alive():
                log.error("API process pid %s did not exit after its drain: killed", proc.pid)
                proc.kill()
            proc.join(1.0)
            _mark_dead(proc.pid)


async def _model_process(engine: object, settings: Settings, spec: ApiSpec, sock: socket.socket,
                         processes: int, pool: SlotPool) -> int:
    from .metrics import Metrics
    from .runtime.local import LocalModel
    from .transport.host import ModelHost

    metrics = Metrics()
    model = LocalModel(settings, metrics, engine)  # type: ignore[arg-type]
    card = await model.open()
    host = ModelHost(model, card, heartbeat=metrics.sample, pool=pool,  # heartbeat: gauges sampled
                     max_frame=settings.max_request_bytes + (1 << 20))  # a Submit: one request's files + descriptors
    await host.start(spec.ipc_path)
    supervisor = _Supervisor(spec, sock, processes)
    supervisor.start_all()
    starting = asyncio.create_task(_start(model, host))
    announcing = asyncio.create_task(_announce(starting, host, _serving_line(settings, processes)))
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = 0

    def on_signal(sig: int) -> None:
        nonlocal signals
        signals += 1
        if signals == 1:
            supervisor.stopping = True
            sock.close()  # no API process will be started again: once they have closed theirs, the port is closed
            model.begin_drain()
            host.push_status()
            stop.set()
        supervisor.signal_all(sig if signals == 1 else signal.SIGKILL if signals > 2 else signal.SIGTERM)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    watching = asyncio.create_task(supervisor.watch())
    stopped = asyncio.create_task(stop.wait())
    await asyncio.wait({watching, stopped}, return_when=asyncio.FIRST_COMPLETED)
    status = None
    if watching.done():
        try:
            status = watching.result()
        except Exception:  # a bug in the supervision: stop everything rather than serve unsupervised
            log.exception("supervising the API processes failed")
            status = 1
    if status is not None:  # API processes keep dying: stop them all
        supervisor.stopping = True
        sock.close()
        supervisor.signal_all(signal.SIGTERM)
    watching.cancel()
    announcing.cancel()
    drain_s = settings.shutdown_delay_s + settings.shutdown_grace_s + EXIT_MARGIN_S
    await supervisor.wait_all(drain_s)
    await starting
    await model.stop(grace_s=settings.shutdown_grace_s)
    await host.close()
    log.info("model process stopped")
    return status or 0


def _api_processes(count: int) -> str:
    return f"{count} API process" + ("" if count == 1 else "es")


def _serving_line(settings: Settings, processes: int) -> str:
    grpc = f", gRPC on port {settings.grpc_port}" if settings.grpc_port else ""
    return f"serving http://{settings.host}:{settings.port} ({_api_processes(processes)}{grpc})"


async def _start(model: object, host: object) -> bool:
    try:
        await model.start()  # type: ignore[attr-defined]
        started = True
    except Exception:
        started = False  # LocalModel logged it; the status says FAILED with the reason
    host.push_status()  # type: ignore[attr-defined]
    return started


async def _announce(starting: asyncio.Task[bool], host: object, serving: str) -> None:
    """Log "serving" once a request would be answered: the model warmed up and an API process connected."""
    if not await asyncio.shield(starting):
        return
    await host.connected.wait()  # type: ignore[attr-defined]
    log.info("%s", serving)


async def _until_one_exits(procs: list[BaseProcess], timeout: float | None) -> None:
    """Return when one of ``procs`` has ended (its ``sentinel`` turns readable), or after ``timeout``
    seconds: the supervisor waits on events, not on a poll of ``is_alive``."""
    loop = asyncio.get_running_loop()
    ended: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ended.done():
            ended.set_result(None)

    fds = [proc.sentinel for proc in procs]
    for fd in fds:
        loop.add_reader(fd, wake)
    try:
        await asyncio.wait({ended}, timeout=timeout)
    finally:
        for fd in fds:
            loop.remove_reader(fd)


def _mark_dead(pid: int | None) -> None:
    """Its live gauges (requests in flight) leave the merge; its counters stay in the totals."""
    if pid is not None:
        with contextlib.suppress(OSError):
            mark_process_dead(pid)


# -- the API process ------------------------------------------------------------------------------
def _die_with_parent() -> None:
    """SIGTERM when the model process dies (Linux), even if it could not say goodbye."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _remove_after(spec: ApiSpec) -> None:
    """The model process died without cleaning up (kill -9): its pool and work directory go now, not at
    the next start. Only when it is really gone (a clean stop closes the connection too, then cleans up)."""
    with contextlib.suppress(Exception):
        if not spec.model_pid or not dead(spec.model_pid):
            return
        if spec.pool_name:
            with contextlib.suppress(FileNotFoundError):
                segment = shared_memory.SharedMemory(name=spec.pool_name)
                segment.close()
                segment.unlink()  # also tells the resource tracker it is gone
        remove_own(spec.ipc_path.parent, spec.model_pid)


def api_main(spec: ApiSpec, sock: socket.socket) -> None:
    """An API process: the front end's app on the inherited socket, the model behind a RemoteModel."""
    os.setpgrp()  # a terminal's Ctrl-C reaches the model process only, which forwards one SIGTERM
    _die_with_parent()
    if spec.metrics_dir is not None:
        enable_multiprocess(spec.metrics_dir)
    configure_logging(spec.log_level, spec.settings.log_format, f"api-{spec.index}")
    import torch

    torch.set_num_threads(1)  # no model here: a thread team would only spin beside the model process's
    from .frontend.app import make_app
    from .frontend.http_server import make_server
    from .metrics import Metrics
    from .transport.client import RemoteModel

    server_box: list[object] = []

    def lost() -> None:  # the model process is gone: answer 503 briefly, then exit (serve is ending)
        loop = asyncio.get_event_loop()
        loop.call_later(0.5, _remove_after, spec)  # by then the dead process is a zombie at least
        if server_box:
            loop.call_later(1.0, setattr, server_box[0], "should_exit", True)

    def stalled() -> None:  # the model process is hung: kill it, so that serve ends non-zero (it cannot itself)
        if spec.model_pid and os.getppid() == spec.model_pid:  # never another process that took its pid
            with contextlib.suppress(ProcessLookupError):
                os.kill(spec.model_pid, signal.SIGKILL)

    metrics = Metrics()
    s = spec.settings
    shared = (spec.pool_name, spec.ipc_path.parent / LOCK_NAME) if spec.pool_name else None
    model = RemoteModel(spec.ipc_path, spec.slots, on_lost=lost, on_reject=metrics.reject, stall_s=s.model_stall_s,
                        stall_exit_s=s.model_stall_exit_s, on_stall=stalled, shared_pool=shared)
    app = make_app(spec.settings, model, metrics, shared_ports=True)
    server = make_server(app, spec.settings, spec.log_level)
    server_box.append(server)
    server.run(sockets=[sock])
    _remove_after(spec)  # if the model process died meanwhile
    sys.exit(0 if server.started else 1)
