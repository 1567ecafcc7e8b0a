"""SIGTERM into a burst of requests on a real ``patchlife serve``: every request sent on an accepted
connection gets an answer, 200 or 503 (never a reset, never a 500), over new and kept-alive connections,
including a request still uploading its body when the grace ends."""

from __future__ import annotations

import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
from service_support import encode, photo, serve_process
from test_connections import connect, multipart, raw_request, read_answer

# About 225 kB: small enough to sit whole in the socket buffers, so before issue 25 a 503 sent without
# reading it was followed by a close with unread bytes, a reset, and a lost answer (ReadError).
BODY = encode(photo((300, 250)), "PNG")
FORM, FORM_TYPE = multipart(BODY)  # encoded once: the client threads only send
KEPT_ALIVE, REQUESTS_EACH, NEW = 8, 5, 40  # 80 requests
ENV = {"PATCHLIFE_SHUTDOWN_GRACE_S": "2", "PATCHLIFE_MAX_DECODE_PIXELS": str(300 * 250),
       "PATCHLIFE_DECODE_WAIT_MS": "60000"}


def classify(client: httpx.Client) -> str:
    try:
        r = client.post("/classify", content=FORM, headers={"content-type": FORM_TYPE})
    except httpx.ConnectError:
        return "refused"  # never accepted: the listener had closed
    except httpx.TransportError as exc:
        return f"no answer ({type(exc).__name__})"
    return str(r.status_code)


def sigterm_into_a_burst(proc: subprocess.Popen[bytes], base: str, signal_after_s: float) -> list[tuple[str, str]]:
    """80 requests on 8 kept-alive and 40 new connections, SIGTERM ``signal_after_s`` into them; each
    request's (connection kind, outcome) once every client is done. Also used with API processes
    (tests/service/test_processes.py)."""
    outcomes: list[tuple[str, str]] = []
    lock = threading.Lock()

    def kept_alive() -> None:
        with httpx.Client(base_url=base, timeout=60, limits=httpx.Limits(max_connections=1)) as client:
            assert classify(client) == "200"  # the connection is open and kept alive before the burst
            start.wait()
            for _ in range(REQUESTS_EACH):
                out = classify(client)
                with lock:
                    outcomes.append(("kept-alive", out))

    def new_connection(delay_s: float) -> None:
        start.wait()
        time.sleep(delay_s)
        with httpx.Client(base_url=base, timeout=60) as client:
            out = classify(client)
        with lock:
            outcomes.append(("new", out))

    start = threading.Barrier(KEPT_ALIVE + NEW + 1)
    threads = [threading.Thread(target=kept_alive) for _ in range(KEPT_ALIVE)]
    threads += [threading.Thread(target=new_connection, args=(i * 0.025,)) for i in range(NEW)]
    for t in threads:
        t.start()
    start.wait()
    time.sleep(signal_after_s)
    proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(120)
    return outcomes


def check_burst(pairs: list[tuple[str, str]], log: str, what: str) -> None:
    """Every request of the burst answered 200 or 503, or never accepted; no 500 in the log."""
    counts = {f"{k} {o}": pairs.count((k, o)) for k, o in sorted(set(pairs))}
    print(f"\n{what}: {counts}")
    assert len(pairs) == KEPT_ALIVE * REQUESTS_EACH + NEW
    assert {o for _, o in pairs} <= {"200", "503", "refused"}, counts  # refused: never accepted (listener closed)
    assert "Exception in ASGI application" not in log and " 500" not in log, log[-3000:]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("signal_after_s", [0.1, 0.3, 1.0])
def test_sigterm_into_a_burst_answers_every_request(checkpoint_dir: Path, signal_after_s: float) -> None:
    with serve_process(checkpoint_dir, ENV) as (proc, base):
        pairs = sigterm_into_a_burst(proc, base, signal_after_s)
        assert proc.wait(timeout=60) == 0
        log = proc.stderr.read().decode()  # type: ignore[union-attr]
    check_burst(pairs, log, f"SIGTERM {signal_after_s} s into 80 requests")


@pytest.mark.timeout(120)
def test_a_request_still_uploading_when_the_grace_ends_gets_503(checkpoint_dir: Path) -> None:
    body, ctype = multipart(BODY[:200_000])
    pieces = [body[i:i + 10_000] for i in range(0, len(body), 10_000)]  # 20 pieces, 0.1 s apart: 2 s
    env = {"PATCHLIFE_SHUTDOWN_GRACE_S": "0.5", "PATCHLIFE_READ_TIMEOUT_S": "5"}
    with serve_process(checkpoint_dir, env) as (proc, base), connect(base) as sock:
        sock.sendall(raw_request("/classify", b"", {"Content-Type": ctype, "Content-Length": str(len(body))}))
        t0 = time.monotonic()
        for i, piece in enumerate(pieces):
            if i == 3:
                proc.send_signal(signal.SIGTERM)
            try:
                sock.sendall(piece)
            except OSError:
                break  # the server answered and closed; the answer is read below
            time.sleep(0.1)
        sock.shutdown(socket.SHUT_WR)
        status, headers, content = read_answer(sock)
        print(f"\nuploading at SIGTERM: {status} after {time.monotonic() - t0:.1f} s")
        assert status in (200, 503), content
        assert status == 200 or headers["connection"] == "close"
        assert proc.wait(timeout=30) == 0
