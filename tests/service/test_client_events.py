"""What a client does is a client event, never the bug path (issue 34), against a real ``patchlife serve``
with two API processes: clients that leave during the upload, the headers or the queue (499, at most one
INFO line, no traceback, no 5xx in /metrics), giant headers (431 / 414, the process stays responsive),
and a half-closed connection (it gets its answer)."""

from __future__ import annotations

import base64
import json
import re
import signal
import socket
import struct
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from service_support import encode, photo
from test_connections import connect, multipart, raw_request, read_answer
from test_processes import Service, multi

PNG = encode(photo((48, 40), seed=5), "PNG")
INFER = "/v2/models/nano-test/infer"


@pytest.fixture(scope="module")
def service(checkpoint_dir: Path) -> Iterator[Service]:
    with multi(checkpoint_dir, {"PATCHLIFE_MAX_HEADER_BYTES": "32768"}) as s:
        yield s


def rid() -> str:
    return f"gone-{uuid.uuid4().hex[:12]}"


def leave_mid_upload(url: str, path: str, body: bytes, ctype: str) -> str:
    """Headers and half the body, then close."""
    request_id = rid()
    with connect(url) as sock:
        sock.sendall(raw_request(path, body, {"Content-Type": ctype, "X-Request-ID": request_id})[:-len(body) // 2])
        time.sleep(0.3)
    return request_id


def status_counts(url: str) -> dict[str, float]:
    """patchlife_http_request_duration_seconds_count summed by status, from /metrics."""
    out: dict[str, float] = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        found = re.match(r'patchlife_http_request_duration_seconds_count\{.*status="(\d+)".*\} (\S+)', line)
        if found:
            out[found.group(1)] = out.get(found.group(1), 0.0) + float(found.group(2))
    return out


@pytest.mark.timeout(300)
def test_clients_that_leave_are_499_with_one_info_line_and_no_traceback(service: Service) -> None:
    before = status_counts(service.url)
    form, form_type = multipart(PNG * 20)
    as_json = json.dumps({"images": [base64.b64encode(PNG * 20).decode()]}).encode()
    v2 = json.dumps({"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1],
                                 "data": [base64.b64encode(PNG * 20).decode()]}]}).encode()
    left = [leave_mid_upload(service.url, "/classify", form, form_type) for _ in range(5)]
    left += [leave_mid_upload(service.url, "/classify", as_json, "application/json"),
             leave_mid_upload(service.url, "/explain", form, form_type),
             leave_mid_upload(service.url, "/classify", PNG * 20, "image/png"),
             leave_mid_upload(service.url, INFER, v2, "application/json")]
    with connect(service.url) as sock:  # in the middle of the headers
        sock.sendall(b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Le")
        time.sleep(0.2)
    queued = []
    service.proc.send_signal(signal.SIGSTOP)  # the model process: requests wait in it until their client leaves
    try:
        body, ctype = multipart(PNG)
        for _ in range(4):
            queued.append(rid())
            with connect(service.url) as sock:
                sock.sendall(raw_request("/classify", body, {"Content-Type": ctype, "X-Request-ID": queued[-1]}))
                time.sleep(1.0)  # decoded and handed to the model process by then
                # an abortive close (a reset): a plain close after a whole request reads as a half-close, which
                # is answered (test_a_half_closed_connection_gets_its_answer)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    finally:
        service.proc.send_signal(signal.SIGCONT)
    time.sleep(1.0)
    assert httpx.post(service.url + "/classify", files={"file": ("a.png", PNG, "image/png")},
                      timeout=30).status_code == 200
    log = service.read_log()
    after = status_counts(service.url)
    new = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    print(f"\nstatuses counted while clients left: {new}")
    assert "Traceback" not in log and " ERROR " not in log and "unhandled" not in log, log[-4000:]
    assert not [k for k, v in new.items() if k.startswith("5") and v], new
    assert new.get("499", 0) >= len(left) + len(queued), new
    for request_id in left + queued:
        lines = [line for line in log.splitlines() if request_id in line]
        assert len(lines) <= 1, lines
        assert all(" INFO " in line and "499" in line for line in lines), lines


@pytest.mark.parametrize("size", [40_000, 16 * 2**20])
def test_headers_over_the_limit_are_431_and_the_process_stays_responsive(service: Service, size: int) -> None:
    with connect(service.url) as sock:
        head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: "
        t0 = time.monotonic()
        try:
            sock.sendall(head + b"a" * size + b"\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused before it was all sent
        status, headers, content = read_answer(sock)
        took = time.monotonic() - t0
    print(f"\n{size}-byte header: {status} in {took:.2f} s")
    assert status == 431 and headers["connection"] == "close", content
    assert json.loads(content)["error"]["code"] == "headers_too_large"
    t0 = time.monotonic()
    assert httpx.get(service.url + "/healthz", timeout=10).status_code == 200
    assert time.monotonic() - t0 < 1.0


def test_a_long_url_is_414_and_headers_under_the_limit_are_served(service: Service) -> None:
    r = httpx.get(service.url + "/healthz?" + "q" * 40_000, timeout=10)
    assert r.status_code == 414 and r.json()["error"]["code"] == "uri_too_long", r.text
    r = httpx.get(service.url + "/healthz", headers={f"X-H{i}": "v" * 1000 for i in range(20)}, timeout=10)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("path", ["/classify", "/healthz"])
def test_a_half_closed_connection_gets_its_answer(service: Service, path: str) -> None:
    body, ctype = multipart(PNG)
    with connect(service.url) as sock:
        if path == "/healthz":
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        else:
            sock.sendall(raw_request(path, body, {"Content-Type": ctype}))
        sock.shutdown(socket.SHUT_WR)
        status, _, content = read_answer(sock)
        assert status == 200, content
        sock.settimeout(5)
        assert sock.recv(10) == b""  # then closed: nothing more can come
