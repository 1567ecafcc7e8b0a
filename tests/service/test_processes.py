"""``patchlife serve`` with API processes (``PATCHLIFE_API_PROCESSES=2``: one model process, two API
processes on one port, pixels through shared memory) as real processes on the CPU, against what the
single-process service (``PATCHLIFE_API_PROCESSES=0``) does: the same answers and errors, deadlines and
overload, request ids in the logs of both kinds of process, the SIGTERM drain, readiness while the
model loads and after it dies, a dead API process replaced, clients that leave mid-request.

Which API process answered a request is read from the access log: each line names its process
(``api-1``, ``api-2``) and carries the request's X-Request-ID.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from service_support import REPO, encode, photo, png_bomb, process_tree, serve_process
from test_connections import connect, raw_request
from test_drain import ENV as DRAIN_ENV
from test_drain import check_burst, sigterm_into_a_burst

from bench.child import free_port, stop
from service.transport.client import LOST

API2 = {"PATCHLIFE_API_PROCESSES": "2"}
# Small limits (as tests/service/conftest.py's apps); max_batch_waste=0 so that an answer never depends on the
# cost model's timings, which differ between two servers; one torch thread in both modes (with API processes
# the model's team is the cores they leave: another team sums in another order, a last-bit difference);
# 4 pixel slots per API process: one request's worth.
LIMITS = {"PATCHLIFE_MAX_UPLOAD_BYTES": "200000", "PATCHLIFE_MAX_REQUEST_BYTES": "1000000",
          "PATCHLIFE_MAX_IMAGES_PER_REQUEST": "4", "PATCHLIFE_MAX_TOP_K": "5", "PATCHLIFE_MAX_DELAY_MS": "1",
          "PATCHLIFE_MAX_BATCH_WASTE": "0", "PATCHLIFE_PIXEL_SLOTS": "4", "PATCHLIFE_TORCH_THREADS": "1"}
INFER = "/v2/models/nano-test/infer"
PNGS = [encode(photo(seed=i), "PNG") for i in range(4)]
JPEG = encode(photo((300, 200), seed=9), "JPEG", quality=90)


@dataclass
class Service:
    proc: subprocess.Popen[bytes]
    url: str
    read_log: Callable[[], str]

    def api_pids(self) -> list[int]:
        """The API processes (the model process's children but multiprocessing's resource tracker)."""
        pids = []
        for pid in process_tree(self.proc.pid)[1:]:
            with contextlib.suppress(OSError):
                if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    pids.append(pid)
        return sorted(pids)

    def wait_connected(self, n: int = 2, timeout_s: float = 180.0, old: tuple[int, ...] = ()) -> list[int]:
        """Until ``n`` API processes (none of ``old``) are up and connected to the model process."""
        end = time.monotonic() + timeout_s
        while True:
            pids, log = self.api_pids(), self.read_log()
            if len(pids) == n and not set(pids) & set(old) and all(f"API process {p} connected" in log for p in pids):
                return pids
            assert self.proc.poll() is None and time.monotonic() < end, f"{n} API processes not up:\n{log[-3000:]}"
            time.sleep(0.1)

    def answered_by(self, request_id: str, timeout_s: float = 5.0) -> tuple[str, int]:
        """(``api-N``, status) from the access log line of the request with that X-Request-ID."""
        found = self.answer_of(request_id, timeout_s)
        assert found is not None, f"no access log line for {request_id}"
        return found

    def answer_of(self, request_id: str, timeout_s: float) -> tuple[str, int] | None:
        """(``api-N``, status) of that request's access log line, or None when none comes in ``timeout_s``."""
        pattern = re.compile(rf" (api-\d+) uvicorn\.access \[{re.escape(request_id)}\]: .* (\d{{3}})$", re.M)
        end = time.monotonic() + timeout_s
        while not (found := pattern.search(self.read_log())):
            if time.monotonic() >= end:
                return None
            time.sleep(0.02)
        return found.group(1), int(found.group(2))


@contextlib.contextmanager
def multi(checkpoint: Path, env: dict[str, str], log_level: str = "info") -> Iterator[Service]:
    """A ready ``patchlife serve`` with two API processes, both connected."""
    with serve_process(checkpoint, {**API2, **env}, log_level=log_level) as (proc, url):
        service = Service(proc, url, lambda: proc.stderr.read().decode())  # type: ignore[union-attr]
        service.wait_connected()
        yield service


@contextlib.contextmanager
def unready(checkpoint: Path, env: dict[str, str]) -> Iterator[Service]:
    """``patchlife serve`` with two API processes, not waited for (its model may still be loading)."""
    port = free_port()
    full = {**os.environ, "PATCHLIFE_DEVICE": "cpu", "PATCHLIFE_HOST": "127.0.0.1",
            "PATCHLIFE_PORT": str(port), "PATCHLIFE_GRPC_PORT": "0", **API2, **env}
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen([sys.executable, "-m", "cli", "serve", "--checkpoint", str(checkpoint),
                                 "--log-level", "info"], env=full, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)

        def read() -> str:
            log.seek(0)
            return log.read().decode(errors="replace")

        try:
            yield Service(proc, f"http://127.0.0.1:{port}", read)
        finally:
            stop(proc, grace_s=10)


def segments(pids: list[int]) -> set[str]:
    """Names of the shared-memory segments the processes ``pids`` have mapped."""
    names: set[str] = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            names |= set(re.findall(r"/dev/shm/((?:psm|patchlife)_\w+)", Path(f"/proc/{pid}/maps").read_text()))
    return names


def alive(pids: list[int]) -> list[int]:
    """Those of ``pids`` that still run (a zombie has ended)."""
    out = []
    for pid in pids:
        with contextlib.suppress(OSError, IndexError):
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                out.append(pid)
    return out


def wait_gone(pids: list[int], timeout_s: float = 15.0) -> None:
    end = time.monotonic() + timeout_s
    while alive(pids):
        assert time.monotonic() < end, f"processes left running: {alive(pids)}"
        time.sleep(0.05)


def rid(what: str) -> str:
    return f"{what}-{uuid.uuid4().hex[:12]}"


def files(*images: bytes, kind: str = "image/png") -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (f"{i}.img", data, kind)) for i, data in enumerate(images)]


def comparable(r: httpx.Response) -> tuple[int, str, Any]:
    """Status, type and body, without the timings (the only thing that may differ between two servers)."""
    def strip(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if k != "timings_ms"}
        return [strip(v) for v in x] if isinstance(x, list) else x

    ctype = r.headers.get("content-type", "")
    return r.status_code, ctype, strip(r.json()) if ctype.startswith("application/json") else r.content


# -- the same answers as the single-process service ----------------------------------------------
@pytest.fixture(scope="module")
def single(checkpoint_dir: Path) -> Iterator[str]:
    with serve_process(checkpoint_dir, {"PATCHLIFE_API_PROCESSES": "0", **LIMITS}) as (_, url):
        yield url


@pytest.fixture(scope="module")
def service(checkpoint_dir: Path) -> Iterator[Service]:
    """Two API processes, logging at debug (the model process logs each request it answers)."""
    with multi(checkpoint_dir, LIMITS, log_level="debug") as s:
        yield s


def v2_images(data: list[bytes]) -> dict[str, Any]:
    return {"name": "images", "datatype": "BYTES", "shape": [len(data)],
            "data": [base64.b64encode(d).decode() for d in data]}


def v2_binary(data: list[bytes]) -> dict[str, Any]:
    """httpx arguments of a /v2 infer with binary tensor data both ways (as in tests/service/frontend/test_v2.py)."""
    blob = b"".join(struct.pack("<I", len(d)) + d for d in data)
    head = json.dumps({"inputs": [{"name": "images", "datatype": "BYTES", "shape": [len(data)],
                                   "parameters": {"binary_data_size": len(blob)}}],
                       "parameters": {"binary_data_output": True, "top_k": 2}}).encode()
    return {"content": head + blob, "headers": {"Inference-Header-Content-Length": str(len(head)),
                                                "content-type": "application/octet-stream"}}


SAME = {  # name: method, path, httpx keyword arguments
    "classify 3 images top_k": ("POST", "/classify", dict(files=files(*PNGS[:3]), params={"top_k": "3"})),
    "classify 4 images keep_rate": ("POST", "/classify", dict(files=files(*PNGS), params={"keep_rate": "0.5"})),
    "classify jpeg raw body": ("POST", "/classify", dict(content=JPEG, headers={"content-type": "image/jpeg"})),
    "classify json base64": ("POST", "/classify", dict(json={"images": [base64.b64encode(PNGS[3]).decode()],
                                                             "top_k": 2, "keep_rate": 0.9})),
    "explain png": ("POST", "/explain", dict(files=files(JPEG, kind="image/jpeg"))),
    "explain json": ("POST", "/explain", dict(files=files(PNGS[1]), params={"format": "json", "top_k": "1"})),
    "v2 infer json": ("POST", INFER, dict(json={"id": "r1", "inputs": [v2_images(PNGS[:3])],
                                               "parameters": {"top_k": 3}})),
    "v2 infer binary": ("POST", INFER, v2_binary(PNGS[:2])),
    "v2 model metadata": ("GET", "/v2/models/nano-test", {}),
    "web page": ("GET", "/", {}),
    "web page script": ("GET", "/static/app.js", {}),
    "examples": ("GET", "/v1/examples", {}),
}
ERRORS = {  # name: method, path, httpx keyword arguments, status
    "bad image": ("POST", "/classify", dict(files=files(b"\x89PNG\r\n\x1a\n not really")), 400),
    "file too large": ("POST", "/classify", dict(files=files(b"\0" * 250_000)), 413),
    "body too large": ("POST", "/classify", dict(content=b"\0" * 1_100_000, headers={"content-type": "image/png"}),
                       413),
    "too many images": ("POST", "/classify", dict(files=files(*PNGS, PNGS[0])), 413),
    "decompression bomb": ("POST", "/classify", dict(files=files(png_bomb())), 413),
    "unsupported type": ("POST", "/classify", dict(files=files(PNGS[0], kind="text/plain")), 415),
    "bad top_k": ("POST", "/classify", dict(files=files(PNGS[0]), params={"top_k": "0"}), 422),
    "bad keep_rate": ("POST", "/explain", dict(files=files(PNGS[0]), params={"keep_rate": "1.5"}), 422),
    "bad deadline header": ("POST", "/classify", dict(files=files(PNGS[0]), headers={"X-Request-Deadline-Ms": "x"}),
                            422),
    "v2 bad tensor": ("POST", INFER, dict(json={"inputs": [{"name": "images", "datatype": "FP32", "shape": [1],
                                                            "data": [1.0]}]}), 422),
    "v2 unknown model": ("POST", "/v2/models/nope/infer", dict(json={"inputs": []}), 404),
    "deadline passed": ("POST", "/classify", dict(files=files(PNGS[0]),
                                                  headers={"X-Request-Deadline-Ms": "0.001"}), 504),
}


@pytest.mark.timeout(300)
def test_answers_equal_those_of_the_single_process_service(single: str, service: Service) -> None:
    for name, (method, path, kwargs) in SAME.items():
        want = comparable(httpx.request(method, single + path, timeout=30, **kwargs))
        assert want[0] == 200, (name, want)
        for _ in range(2):  # new connections: each lands on either API process
            assert comparable(httpx.request(method, service.url + path, timeout=30, **kwargs)) == want, name


@pytest.mark.parametrize("name", list(ERRORS))
def test_errors_equal_those_of_the_single_process_service(single: str, service: Service, name: str) -> None:
    method, path, kwargs, status = ERRORS[name]
    want = httpx.request(method, single + path, timeout=30, **kwargs)
    got = httpx.request(method, service.url + path, timeout=30, **kwargs)
    assert want.status_code == status, want.text
    assert (got.status_code, got.json()) == (want.status_code, want.json())
    assert got.headers.get("retry-after") == want.headers.get("retry-after")


def test_request_id_is_echoed_and_in_the_logs_of_both_kinds_of_process(service: Service) -> None:
    request_id = rid("trace")
    r = httpx.post(service.url + "/classify", files=files(*PNGS[:2]), headers={"X-Request-ID": request_id})
    assert r.status_code == 200 and r.headers["x-request-id"] == request_id
    assert service.answered_by(request_id)[1] == 200  # an api-N line
    assert re.search(rf" model patchlife\.transport \[{request_id}\]: 2 images answered", service.read_log())


# -- clients that leave, API processes that die --------------------------------------------------
def classify_until_each_process_answered(service: Service, images: int, timeout_s: float = 60.0) -> dict[str, int]:
    """``images``-image requests on new connections until every API process has answered one 200;
    the statuses seen (a 503 overloaded is allowed: slots still held by requests on their way)."""
    seen: dict[str, int] = {}
    by: set[str] = set()
    end = time.monotonic() + timeout_s
    while len(by) < 2:
        assert time.monotonic() < end, f"not every API process answered 200 (answered: {by}, statuses {seen})"
        request_id = rid("after")
        r = httpx.post(service.url + "/classify", files=files(*PNGS[:images]), headers={"X-Request-ID": request_id},
                       timeout=30)
        seen[str(r.status_code)] = seen.get(str(r.status_code), 0) + 1
        assert r.status_code == 200 or (r.status_code == 503 and r.json()["error"]["code"] == "overloaded"), r.text
        if r.status_code == 200:
            by.add(service.answered_by(request_id)[0])
    return seen


def all_served(service: Service, images: int, requests: int = 6) -> None:
    """``requests`` more ``images``-image requests on new connections, one at a time: every one 200."""
    statuses = [httpx.post(service.url + "/classify", files=files(*PNGS[:images]), timeout=30).status_code
                for _ in range(requests)]
    assert statuses == [200] * requests, statuses


@pytest.mark.timeout(180)
def test_clients_that_leave_mid_request_give_their_slots_back(service: Service) -> None:
    """The model process is stopped (SIGSTOP) while clients send 4-image requests (4 slots: all of an
    API process's) and leave; the slots stay taken until the model process answers the cancels (a
    request then is 503 overloaded); once it runs again, each API process serves 4 images again.

    Which API process accepts a connection is the kernel's choice (one may take them all), so requests
    are sent until each API process has refused one: both then hold a request's slots."""
    prepared = httpx.Request("POST", service.url + "/classify", files=files(*PNGS))
    content_type = prepared.headers["content-type"]
    body = prepared.read()
    service.proc.send_signal(signal.SIGSTOP)
    socks = []
    try:
        full: set[str] = set()
        for _ in range(40):
            request_id = rid("leave")
            sock = connect(service.url)
            sock.sendall(raw_request("/classify", body, {"Content-Type": content_type, "X-Request-ID": request_id}))
            socks.append(sock)
            answer = service.answer_of(request_id, timeout_s=1.0)
            if answer is not None:  # no answer: it holds that process's slots (the model process is stopped)
                process, status = answer
                assert status == 503, f"{process} answered {status} while the model process was stopped"
                full.add(process)
            if len(full) == 2:
                break
        assert full == {"api-1", "api-2"}, f"only {sorted(full)} refused a request"
        refused = httpx.post(service.url + "/classify", files=files(PNGS[0]), timeout=30)
        for sock in socks:
            sock.close()
        time.sleep(0.5)
        held = httpx.post(service.url + "/classify", files=files(PNGS[0]), timeout=30)
    finally:
        service.proc.send_signal(signal.SIGCONT)
        for sock in socks:
            sock.close()
    for r in (refused, held):  # each API process holds its 4 slots for a request whose client has gone
        assert r.status_code == 503 and r.json()["error"]["code"] == "overloaded", r.text
        assert "PATCHLIFE_PIXEL_SLOTS" in r.json()["error"]["message"] and r.headers["retry-after"] == "1"
    classify_until_each_process_answered(service, images=4)
    all_served(service, images=4)  # every slot came back: no 4-image request is refused any more


# -- overload ---------------------------------------------------------------------------------------
@pytest.mark.timeout(240)
def test_overload_is_503_with_retry_after_from_either_process(checkpoint_dir: Path) -> None:
    """2 pixel slots per API process, 1 image in the model's queue: 3 images are refused by the API
    process (its slots), 2 by the model process (its queue), 1 is served."""
    env = {"PATCHLIFE_PIXEL_SLOTS": "2", "PATCHLIFE_QUEUE_CAPACITY_IMAGES": "1"}
    with multi(checkpoint_dir, env) as s:
        for images, where in ((3, "PATCHLIFE_PIXEL_SLOTS"), (2, "queue full")):
            for _ in range(3):
                r = httpx.post(s.url + "/classify", files=files(*PNGS[:images]), timeout=30)
                assert r.status_code == 503 and r.json()["error"]["code"] == "overloaded", r.text
                assert where in r.json()["error"]["message"] and int(r.headers["retry-after"]) >= 1
        seen = classify_until_each_process_answered(s, images=1)
        assert seen.keys() == {"200"}, f"a refused request held slots or queue places after its 503: {seen}"


# -- SIGTERM -----------------------------------------------------------------------------------------
@pytest.mark.timeout(240)
def test_sigterm_drain_answers_every_request_and_leaves_nothing_behind(checkpoint_dir: Path) -> None:
    with multi(checkpoint_dir, DRAIN_ENV) as s:
        tree = process_tree(s.proc.pid)
        shm = segments(tree)
        assert len(shm) == 1, shm  # one pool for every API process
        pairs = sigterm_into_a_burst(s.proc, s.url, 0.3)
        assert s.proc.wait(timeout=60) == 0
        log = s.read_log()
    check_burst(pairs, log, "2 API processes, SIGTERM 0.3 s into 80 requests")
    wait_gone(tree)
    assert not [n for n in shm if Path("/dev/shm", n).exists()], shm
    assert "Traceback" not in log and "leaked" not in log, log[-3000:]


# -- readiness, and processes that die ---------------------------------------------------------------
def lost_by(log: str) -> set[str]:
    """The API processes (``api-N``) that logged losing the model process, or draining: the model process's
    death reaches each as the end of its connection and as SIGTERM (PR_SET_PDEATHSIG), and the drain may
    stop the connection's reader before it has read the end (it did while the model was loading)."""
    return set(re.findall(rf" (api-\d+) \S+ .*(?:{re.escape(LOST)}|drained: )", log))


def readyz_until_closed(url: str, timeout_s: float = 20.0) -> list[int]:
    """/readyz on new connections until none is accepted; the statuses."""
    statuses, end = [], time.monotonic() + timeout_s
    while time.monotonic() < end:
        try:
            statuses.append(httpx.get(url + "/readyz", timeout=5).status_code)
        except httpx.TransportError:
            return statuses
        time.sleep(0.02)
    raise AssertionError(f"still answering after {timeout_s} s: {statuses[-5:]}")


@pytest.mark.timeout(300)
def test_readyz_is_503_in_every_api_process_while_loading_and_a_dead_model_ends_serve(checkpoint_dir: Path) -> None:
    with unready(checkpoint_dir, {"PATCHLIFE_WARMUP_BATCHES": "1000000"}) as s:  # warms up for ever
        pids = s.wait_connected()
        loading: set[str] = set()
        end = time.monotonic() + 60
        while len(loading) < 2:
            assert time.monotonic() < end, f"not every API process answered (answered: {loading})"
            request_id = rid("ready")
            r = httpx.get(s.url + "/readyz", headers={"X-Request-ID": request_id}, timeout=10)
            assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready", r.text
            assert "loading" in r.json()["error"]["message"]
            loading.add(s.answered_by(request_id)[0])
        tree = process_tree(s.proc.pid)
        s.proc.send_signal(signal.SIGKILL)
        assert s.proc.wait(timeout=10) != 0
        statuses = readyz_until_closed(s.url)
        wait_gone(pids)
        assert lost_by(s.read_log()) == {"api-1", "api-2"}, s.read_log()[-3000:]  # each ended for that reason
    # the port closes within about 0.1 s (no shutdown delay), often before a probe lands: then no status
    assert set(statuses) <= {503}, statuses
    wait_gone(tree)


@contextlib.contextmanager
def under_load(url: str, clients: int = 4) -> Iterator[list[str]]:
    """``clients`` threads sending 2-image requests on new connections; the outcomes, filled in as they come."""
    done, outcomes = threading.Event(), []

    def load() -> None:
        while not done.is_set():
            try:
                outcomes.append(str(httpx.post(url + "/classify", files=files(*PNGS[:2]), timeout=30).status_code))
            except httpx.TransportError as exc:
                outcomes.append(type(exc).__name__)

    threads = [threading.Thread(target=load, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    try:
        yield outcomes
    finally:
        done.set()
        for t in threads:
            t.join(60)


@pytest.mark.timeout(300)
def test_a_dead_api_process_is_replaced_and_a_dead_model_process_ends_serve(checkpoint_dir: Path) -> None:
    with multi(checkpoint_dir, {}) as s:
        victim = s.api_pids()[0]
        victim_segments = segments([victim])
        with under_load(s.url, clients=6) as outcomes:
            time.sleep(0.5)
            s.proc.send_signal(signal.SIGSTOP)  # requests of both API processes wait in the model process
            try:
                time.sleep(1.0)
                os.kill(victim, signal.SIGKILL)
                time.sleep(0.5)
            finally:
                s.proc.send_signal(signal.SIGCONT)
            s.wait_connected(old=(victim,), timeout_s=120)  # its replacement
            time.sleep(1.0)
        counts = {o: outcomes.count(o) for o in sorted(set(outcomes))}
        print(f"\nAPI process {victim} killed with requests in the model process: {counts}")
        assert counts.get("200", 0) > 0 and set(counts) - {"200"} <= {"RemoteProtocolError", "ReadError"}, counts
        assert len(outcomes) - counts["200"] <= 6, counts  # only what the dead one held (6 clients)
        assert victim_segments and all(Path("/dev/shm", n).exists() for n in victim_segments)  # the shared pool
        classify_until_each_process_answered(s, images=2)
        all_served(s, images=2)

        tree = process_tree(s.proc.pid)
        shm = segments(s.api_pids())
        s.proc.send_signal(signal.SIGKILL)
        assert s.proc.wait(timeout=10) != 0
        statuses = readyz_until_closed(s.url)
        wait_gone(tree)
        assert lost_by(s.read_log()) == {"api-1", "api-2"}, s.read_log()[-3000:]  # each ended for that reason
    assert set(statuses) <= {503}, statuses  # as in the test above: possibly none
    assert not [n for n in shm if Path("/dev/shm", n).exists()], shm
