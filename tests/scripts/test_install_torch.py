"""scripts/install_torch.py: which torch build `make install` picks, and its fallback when PyTorch's CPU
index cannot be reached (as here and in CI: only the package registries are)."""

from __future__ import annotations

import importlib.util
import re
import socket
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import tomllib

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("install_torch", REPO / "scripts" / "install_torch.py")
assert _spec is not None and _spec.loader is not None
install_torch = importlib.util.module_from_spec(_spec)
sys.modules["install_torch"] = install_torch  # dataclasses look their module up there
_spec.loader.exec_module(install_torch)


class _Index(BaseHTTPRequestHandler):
    def do_HEAD(self) -> None:  # noqa: N802 (http.server's name)
        self.send_response(200 if self.path == "/whl/cpu/torch/" else 404)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def index() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Index)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/whl/cpu"
    server.shutdown()
    server.server_close()


@pytest.fixture
def silent() -> Iterator[str]:
    """A server that accepts connections and never answers (a firewall that swallows packets)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}/whl/cpu"
    sock.close()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_requirements_are_pyprojects_own() -> None:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    wanted = [d.replace(" ", "") for d in deps if re.match(r"(torch|torchvision)[<>=!~]", d)]
    assert install_torch.requirements() == wanted and len(wanted) == 2


def test_requirements_missing_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text('[project]\ndependencies = ["torch>=2.2"]\n')
    with pytest.raises(ValueError, match="torchvision"):
        install_torch.requirements(tmp_path / "pyproject.toml")


def test_probe_answers(index: str) -> None:
    assert install_torch.reachable(index + "/torch/", timeout=5)
    assert not install_torch.reachable(index + "/nothing/", timeout=5)  # 404: not an index of torch


def test_probe_refused_and_silent_are_unreachable_within_the_timeout(silent: str) -> None:
    assert not install_torch.reachable(f"http://127.0.0.1:{_closed_port()}/whl/cpu/torch/", timeout=5)
    start = time.monotonic()
    assert not install_torch.reachable(silent + "/torch/", timeout=0.5)
    assert time.monotonic() - start < 3  # bounded by the timeout, not by the server (which never answers)


def test_cpu_from_the_index_when_it_answers(index: str) -> None:
    chosen = install_torch.plan("cpu", index, 5)
    assert chosen.command is not None
    assert chosen.command[-4:] == ["--index-url", index, *install_torch.requirements()]


def test_cpu_falls_back_to_the_default_when_the_index_is_unreachable() -> None:
    chosen = install_torch.plan("cpu", f"http://127.0.0.1:{_closed_port()}/whl/cpu", 1)
    assert chosen.command is None and "falling back" in chosen.reason


@pytest.mark.parametrize("linux,driver,expect_cpu", [(True, False, True), (True, True, False), (False, False, False)])
def test_auto(index: str, linux: bool, driver: bool, expect_cpu: bool) -> None:
    chosen = install_torch.plan("auto", index, 5, linux=linux, driver=lambda: driver)
    assert (chosen.command is not None) == expect_cpu, chosen.reason


def test_cuda_never_probes() -> None:
    def probe(url: str, timeout: float) -> bool:
        raise AssertionError("probed")

    assert install_torch.plan("cuda", "http://unused", 1, probe=probe).command is None


def test_main_runs_pip_or_falls_back(index: str, capsys: pytest.CaptureFixture[str]) -> None:
    ran: list[list[str]] = []
    assert install_torch.main(["cpu", "--index", index], run=lambda cmd: ran.append(cmd) or 0) == 0
    assert len(ran) == 1 and "--index-url" in ran[0]
    # pip failing against the index (a release missing there) is not fatal: pip's default follows
    assert install_torch.main(["cpu", "--index", index], run=lambda cmd: 1) == 0
    assert "falling back" in capsys.readouterr().err
    dead = f"http://127.0.0.1:{_closed_port()}/whl/cpu"
    assert install_torch.main(["cpu", "--index", dead], run=lambda cmd: ran.append(cmd) or 0) == 0
    assert len(ran) == 1  # nothing more was run
