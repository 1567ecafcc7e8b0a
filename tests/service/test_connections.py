"""Connections against a real ``patchlife serve``: kept-alive connections survive bad requests, slow and
silent clients are timed out with an answer (or a close when nothing was read), and a bug is one JSON
500 with ``Connection: close`` and one log record."""

from __future__ import annotations

import json
import logging
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from service_support import encode, photo, serve_process

from service.frontend import oip

PNG = encode(photo((48, 40)), "PNG")
INFER = "/v2/models/nano-test/infer"
TIMEOUTS = {"PATCHLIFE_READ_TIMEOUT_S": "1", "PATCHLIFE_KEEPALIVE_TIMEOUT_S": "1.5"}


@pytest.fixture(scope="module")
def server(checkpoint_dir: Path) -> Iterator[str]:
    with serve_process(checkpoint_dir, TIMEOUTS) as (_, base):
        yield base


def raw_request(path: str, body: bytes, headers: dict[str, str] | None = None) -> bytes:
    head = {"Host": "test", "Content-Length": str(len(body)), **(headers or {})}
    return (f"POST {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in head.items()) + "\r\n").encode() + body


def connect(base: str) -> socket.socket:
    host, port = base.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def read_answer(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 answer (Content-Length framed) from ``sock``; ConnectionError if it closes first."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed without an answer after {data!r}")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    n = int(headers.get("content-length", "0"))
    while len(rest) < n:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed in the middle of an answer")
        rest += chunk
    return int(lines[0].split()[1]), headers, rest[:n]


def multipart(data: bytes, fields: dict[str, str] | None = None) -> tuple[bytes, str]:
    parts = [b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\nContent-Type: image/png\r\n\r\n'
             + data + b"\r\n"]
    for k, v in (fields or {}).items():
        parts.append(f'--b\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode())
    return b"".join(parts) + b"--b--\r\n", "multipart/form-data; boundary=b"


def test_a_kept_alive_connection_keeps_working_after_4xx(server: str) -> None:
    good, ctype = multipart(PNG)
    bad_k, _ = multipart(PNG, {"top_k": "+-5"})
    with connect(server) as sock:
        for body, headers, want in [
                (bad_k, {"Content-Type": ctype}, 422),
                (good, {"Content-Type": ctype}, 200),
                (b"x" * 100_000, {"Content-Type": "text/plain"}, 415),     # refused before its body is read
                (good, {"Content-Type": ctype}, 200),
                (b"{}", {oip.HEADER_LENGTH: "²", "Content-Type": "application/octet-stream"}, 400),
                (good, {"Content-Type": ctype, "X-Request-Deadline-Ms": "nan"}, 422),
                (good, {"Content-Type": ctype}, 200)]:
            path = INFER if oip.HEADER_LENGTH in headers else "/classify"
            sock.sendall(raw_request(path, body, headers))
            status, answer_headers, content = read_answer(sock)
            assert status == want, content
            assert answer_headers.get("connection", "") != "close"


def _pool_request(i: int) -> tuple[bool, dict[str, Any]]:
    """Request ``i`` of the pool test: every tenth one bad, of a kind that used to 500 or close."""
    files = {"file": ("a.png", PNG, "image/png")}
    if i % 10 != 3:
        return True, {"url": "/classify", "files": files}
    kind = (i // 10) % 5
    return False, [
        {"url": "/classify", "files": files, "data": {"top_k": "²"}},
        {"url": "/classify", "files": files, "params": {"keep_rate": "9" * 400}},
        {"url": INFER, "content": b"{}", "headers": {oip.HEADER_LENGTH: "²".encode()}},
        {"url": "/classify", "content": b"\x00" * 50_000, "headers": {"content-type": "text/plain"}},
        {"url": "/classify", "files": {"file": ("a.png", b"not an image", "image/png")}},
    ][kind]


@pytest.mark.timeout(300)
def test_pool_of_8_kept_alive_connections_1000_requests_10_percent_bad(server: str) -> None:
    outcomes: dict[str, int] = {}
    lock = threading.Lock()
    order = list(range(1000))
    random.Random(0).shuffle(order)
    with httpx.Client(base_url=server, timeout=60, limits=httpx.Limits(max_connections=8)) as client:
        def worker(items: list[int]) -> None:
            for i in items:
                valid, kw = _pool_request(i)
                url = kw.pop("url")
                try:
                    status = str(client.post(url, **kw).status_code)
                except httpx.TransportError as exc:
                    status = type(exc).__name__
                key = ("valid " if valid else "bad ") + status
                with lock:
                    outcomes[key] = outcomes.get(key, 0) + 1

        threads = [threading.Thread(target=worker, args=(order[k::8],)) for k in range(8)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    print(f"\npool test, 1000 requests over 8 kept-alive connections in {time.monotonic() - t0:.1f} s: "
          f"{dict(sorted(outcomes.items()))}")
    assert outcomes.get("valid 200") == 900, outcomes
    assert sum(v for k, v in outcomes.items() if k.startswith("bad 4")) == 100, outcomes


def test_headers_that_never_end_get_408(server: str) -> None:
    with connect(server) as sock:
        t0 = time.monotonic()
        sock.sendall(b"POST /classify HTTP/1.1\r\nHost: test\r\nX-Slow: ")
        status, headers, body = read_answer(sock)
        waited = time.monotonic() - t0
    assert status == 408 and headers["connection"] == "close" and 0.8 < waited < 4.0, (status, waited)
    assert json.loads(body)["error"]["code"] == "request_timeout"


def test_a_silent_new_connection_is_closed(server: str) -> None:
    with connect(server) as sock:
        t0 = time.monotonic()
        assert sock.recv(1) == b""  # closed by the server, nothing written
        assert 1.0 < time.monotonic() - t0 < 5.0


@pytest.mark.parametrize(("deadline_ms", "want", "within_s"), [(None, 408, (0.8, 4.0)), ("400", 504, (0.3, 0.9))])
def test_a_client_that_stops_mid_body_is_answered(server: str, deadline_ms: str | None, want: int,
                                                  within_s: tuple[float, float]) -> None:
    body, ctype = multipart(PNG)
    headers = {"Content-Type": ctype, "Content-Length": str(len(body) + 1000)}
    if deadline_ms:
        headers["X-Request-Deadline-Ms"] = deadline_ms
    with connect(server) as sock:
        t0 = time.monotonic()
        sock.sendall(raw_request("/classify", body, headers))
        status, answer_headers, content = read_answer(sock)
        waited = time.monotonic() - t0
    assert status == want and answer_headers["connection"] == "close", content
    assert within_s[0] < waited < within_s[1], waited
    with httpx.Client(base_url=server) as client:  # and it held nothing: the server serves on
        metrics = client.get("/metrics").text
        assert client.post("/classify", files={"file": ("a.png", PNG, "image/png")}).status_code == 200
    in_flight = next(float(line.split()[1]) for line in metrics.splitlines()
                     if line.startswith("patchlife_http_requests_in_flight "))
    assert in_flight == 1  # the scrape itself


def test_a_bug_is_one_json_500_with_connection_close_and_one_log_record(
        make_client: Callable[..., TestClient], caplog: pytest.LogCaptureFixture) -> None:
    c = make_client()
    rt = c.app.state.frontend  # type: ignore[attr-defined]
    rt.preprocessor()  # made from the card
    pre = rt._preprocessor
    # a bug, not bad input (uploads and v2 pixels both meet it)
    pre.config, pre.transform = None, None
    try:
        with caplog.at_level(logging.INFO):
            r = c.post("/classify", files={"file": ("a.png", PNG, "image/png")}, headers={"X-Request-ID": "bug-1"})
            v2 = c.post(INFER, json={"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, 2, 2, 3],
                                                 "data": [0] * 12}]})
    finally:
        rt._preprocessor = None
    assert r.status_code == 500 and r.headers["connection"] == "close" and r.headers["x-request-id"] == "bug-1"
    assert r.json() == {"error": {"code": "internal_error", "message": "internal server error; see the server log"}}
    assert v2.status_code == 500 and set(v2.json()) == {"error"}
    errors = [rec for rec in caplog.records if rec.levelno >= logging.ERROR]
    assert len(errors) == 2 and all(rec.exc_info for rec in errors), [rec.getMessage() for rec in errors]
    assert "bug-1" in errors[0].getMessage()
    assert c.post("/classify", files={"file": ("a.png", PNG, "image/png")}).status_code == 200
