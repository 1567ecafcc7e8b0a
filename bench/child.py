"""``patchlife serve`` as a child process on a free loopback port, ready: what the load test, the
overhead bench and the tests share.

    with serve_child({"PATCHLIFE_BATCHING": "fifo"}) as child:
        httpx.get(child.url + "/v1/models")
    # SIGTERM on leaving (the server drains), a kill if it does not exit in time

``child.cpu_seconds()`` is the CPU time of the server and every process under it (the model process,
API processes, replaced ones included): :mod:`bench.proctree`, sampled by a thread from the first
call on (take differences of two calls for a window).
The child's output goes to a temporary file, never a pipe: a pipe nobody reads until the end fills
up with access-log lines and blocks the server mid-request.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO

import httpx

from .proctree import Sampler, TreeCpu


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ServeChild:
    proc: subprocess.Popen[bytes]
    url: str
    log_file: IO[bytes]
    grpc_target: str | None = None  # host:port of its gRPC listener, when started with grpc=True
    _cpu: Sampler | None = field(default=None, repr=False)

    def cpu_seconds(self) -> float | None:
        """CPU seconds of the server's whole process tree (None once it is gone); the first call starts
        the sampling thread, so only windows after it count every exited process."""
        if self._cpu is None:
            self._cpu = Sampler(TreeCpu(self.proc.pid))
        return self._cpu.seconds()

    def close(self) -> None:
        """Stop sampling (the server itself is stopped by :func:`stop`)."""
        if self._cpu is not None:
            self._cpu.close()

    def log(self) -> str:
        """Everything the child wrote so far (stdout and stderr); it shares the file offset, so seek."""
        self.log_file.seek(0)
        return self.log_file.read().decode(errors="replace")


def stop(proc: subprocess.Popen[bytes], grace_s: float = 30.0) -> None:
    """SIGTERM (the server drains), then a kill if it is still up after ``grace_s``."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def serve_child(env: Mapping[str, str] | None = None, args: Sequence[str] = (), startup_s: float = 300.0,
                cwd: str | None = None, grpc: bool = False, unset: Sequence[str] = (),
                command: Sequence[str] = ("-m", "cli")) -> Iterator[ServeChild]:
    """Start ``patchlife serve`` with ``os.environ`` plus ``env``, less the variables named in ``unset``,
    and extra command-line ``args``; yield once ``/readyz`` answers 200 (RuntimeError with the log's
    tail if it exits or times out first).
    gRPC listens on a free port of its own with ``grpc=True``, else not at all (so that children
    never contend for the default port). ``command``: what runs ``serve`` after the interpreter (benches
    put :mod:`bench.standin_serve` there)."""
    port, grpc_port = free_port(), free_port() if grpc else 0
    full_env = {**{k: v for k, v in os.environ.items() if k not in unset}, **(env or {}),
                "PATCHLIFE_HOST": "127.0.0.1", "PATCHLIFE_PORT": str(port), "PATCHLIFE_GRPC_PORT": str(grpc_port)}
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen([sys.executable, *command, "serve", *args], env=full_env, cwd=cwd,
                                stdout=log, stderr=subprocess.STDOUT)
        child = ServeChild(proc, f"http://127.0.0.1:{port}", log, f"127.0.0.1:{grpc_port}" if grpc else None)
        try:
            _wait_ready(child, startup_s)
            yield child
        finally:
            child.close()
            stop(proc)


def _wait_ready(child: ServeChild, startup_s: float) -> None:
    end = time.monotonic() + startup_s
    with httpx.Client(base_url=child.url, timeout=5.0) as client:
        while True:
            if child.proc.poll() is not None or time.monotonic() > end:
                why = f"exited with {child.proc.returncode}" if child.proc.poll() is not None else \
                    f"not ready in {startup_s:.0f} s"
                raise RuntimeError(f"patchlife serve {why}:\n{child.log()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if client.get("/readyz").status_code == 200:
                    return
            time.sleep(0.1)
