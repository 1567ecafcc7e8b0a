"""``patchlife loadtest``'s other drivers: client processes and wrk, against a real loopback server
(a tiny threaded HTTP server that answers like /classify; no model)."""

from __future__ import annotations

import asyncio
import shutil
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from test_loadtest import args  # the tool's parser with overrides

from bench import loaddrive, loadmix, loadreport, loadtest

RESULT = b'{"labels": [], "timings_ms": {"decode": 1.0}}'


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the load test's clients and wrk expect
    classified = 0
    lock = threading.Lock()

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        body = self.rfile.read(int(self.headers["Content-Length"]))
        n = body.count(b'name="files"')
        with Handler.lock:
            Handler.classified += 1
        self._send(b'{"model": "m", "results": [' + b", ".join([RESULT] * n) + b"]}")

    def do_GET(self) -> None:  # noqa: N802
        if self.path == "/metrics":
            seconds = 0.001 * Handler.classified  # 1 ms of "model time" per request
            self._send(f'patchlife_model_compute_seconds_sum{{phase="head"}} {seconds}\n'.encode(), "text/plain")
        else:
            self.send_error(404)

    def _send(self, payload: bytes, kind: str = "application/json") -> None:
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_split_shares_out_everything() -> None:
    assert loaddrive.split(10, 3) == [4, 3, 3] and loaddrive.split(2, 4) == [1, 1, 0, 0]


def test_client_processes_share_the_load_and_report_their_cpu(url: str) -> None:
    payloads = loadmix.make_requests(loadmix.make_mix(8, [None, 0.7]), 2)
    before = Handler.classified
    with loaddrive.ProcessDriver(2) as driver:
        result = asyncio.run(loadtest.measure(url, payloads, args(clients=4, requests=40, warmup=6, processes=2),
                                              driver=driver))
    assert result["requests"] == 40 and result["errors"] == 0 and result["images"] == 80
    assert Handler.classified - before == 46  # warm-up + measured, each request once
    assert result["client_processes"] == 2 and 0 < result["client_busy_max"] < 4
    assert result["client_cpu_ms_per_request"] > 0
    # /metrics read after the warm-up and before the window: 40 requests' model time, not 46
    assert result["model_busy"] == pytest.approx(0.001 * result["requests_per_s"], rel=0.05)


def test_a_busy_client_is_flagged_in_the_table() -> None:
    r = {"images_per_s": 80.0, "images_per_s_spread": [80.0, 80.0], "p50_ms": 1.0, "p95_ms": 1.0, "p99_ms": 1.0,
         "errors": 0, "passes": [{"images_per_s": 80.0}]}
    calm = loadreport.table({"modes": {"budget": {**r, "client_busy_max": 0.4}}})
    busy = loadreport.table({"modes": {"budget": {**r, "client_busy_max": 0.93}}})
    assert "WARNING" not in calm
    assert "WARNING budget: a load-generating process was busy 93% of a core" in busy


WRK_OUTPUT = """Running 2s test @ http://127.0.0.1:8000/classify
  1 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   120.45ms   10.12ms 200.00ms   90.00%
    Req/Sec   265.00     20.00   300.00     70.00%
  Latency Distribution
     50%  118.20ms
     75%  125.00ms
     90%  131.00ms
     99%    1.20s
  530 requests in 2.00s, 1.00MB read
  Socket errors: connect 0, read 1, write 0, timeout 2
  Non-2xx or 3xx responses: 4
Requests/sec:    264.87
Transfer/sec:    512.00KB
"""


def test_wrk_output_is_parsed() -> None:
    w = loaddrive.parse_wrk(WRK_OUTPUT)
    assert w["requests_per_s"] == 264.87 and w["requests"] == 530 and w["elapsed_s"] == 2.0
    assert w["p50_ms"] == 118.2 and w["p90_ms"] == 131.0 and w["p99_ms"] == 1200.0
    assert w["non_2xx"] == 4 and w["socket_errors"] == 3


@pytest.mark.skipif(shutil.which("wrk") is None, reason="the wrk tool is not installed (Debian: apt-get install wrk)")
def test_wrk_drives_the_server_with_the_prebuilt_body(url: str) -> None:
    payloads = loadmix.make_requests(loadmix.make_mix(4, [None]), 3)
    before = Handler.classified
    result = asyncio.run(loadtest.measure(url, payloads, args(clients=4, warmup=2, duration=1.0, driver="wrk")))
    assert result["errors"] == 0 and result["requests"] > 0 and result["images"] == 3 * result["requests"]
    assert Handler.classified - before >= result["requests"] + 2
    assert result["p50_ms"] is not None and result["client_processes"] == 1


def test_the_open_loop_is_sent_from_the_client_processes(url: str) -> None:
    payloads = loadmix.make_requests(loadmix.make_mix(8, [None]), 1)
    with loaddrive.ProcessDriver(2) as driver:
        result = asyncio.run(loadtest.measure(url, payloads, args(clients=4, requests=40, warmup=4, processes=2,
                                                                  rate_fraction=0.5, duration=2.0), driver=driver))
    opened = result["open_loop"]
    assert opened["errors"] == 0 and opened["client_processes"] == 2 and opened["client_busy_max"] is not None
    assert opened["rate_per_s"] == pytest.approx(0.5 * result["requests_per_s"], rel=0.01)
    assert 0 < opened["images_per_s"] <= 1.5 * opened["rate_per_s"]  # arrivals at about the rate asked, not flat out


def test_client_processes_bring_every_recorded_answer_back(url: str) -> None:
    payloads = loadmix.make_requests(loadmix.make_mix(4, [None]), 2, labels=["a", "b", "c", "d"])
    with loaddrive.ProcessDriver(2) as driver:
        closed, _ = driver.run(url, payloads, 4, 0, 30, 60.0, 10.0, record=True)
        opened, _ = driver.run(url, payloads, 2, 0, 10**9, 1.0, 10.0, rate_per_s=40.0, record=True)
        plain, _ = driver.run(url, payloads, 2, 0, 10, 60.0, 10.0)
    assert closed.answers is not None and len(closed.answers) == 30 == sum(closed.statuses.values())
    assert sorted(i for i, *_ in closed.answers) == sorted(i % 4 for i in range(30))  # each process its own slice
    assert all(status == "200" and body.count(b'"timings_ms"') == 2 for _, status, _, body in closed.answers)
    assert opened.answers is not None and len(opened.answers) == sum(opened.statuses.values()) > 0
    assert plain.answers is None  # nothing kept unless asked
