"""Access keys and HEAD against a real ``patchlife serve`` with two API processes (the keys reach every
API process and its gRPC listener; the warning about open groups is logged once, by the model
process, not once per API process; HEAD goes through uvicorn's own framing on a kept-alive connection).
The per-group cases run in-process: tests/service/frontend/test_access.py and test_grpc_access.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from service_support import REPO, encode, photo
from test_connections import connect, read_answer

from bench.child import ServeChild, serve_child

INFERENCE_KEY, METRICS_KEY = "serve-inference-key", "serve-metrics-key"
PNG = encode(photo(), "PNG")


@pytest.fixture(scope="module")
def keyed(checkpoint_dir: Path) -> Iterator[ServeChild]:
    env = {"PATCHLIFE_DEVICE": "cpu", "PATCHLIFE_WARMUP_BATCHES": "1", "PATCHLIFE_API_PROCESSES": "2",
           "PATCHLIFE_API_KEY_INFERENCE": INFERENCE_KEY, "PATCHLIFE_API_KEY_METRICS": METRICS_KEY}
    # --host 0.0.0.0 (the URL stays 127.0.0.1): not loopback, with the metadata group left open
    args = ["--checkpoint", str(checkpoint_dir), "--log-level", "warning", "--host", "0.0.0.0"]
    with serve_child(env, args, startup_s=180, cwd=str(REPO), grpc=True) as child:
        yield child


def test_the_open_group_warning_is_logged_once(keyed: ServeChild) -> None:
    lines = [line for line in keyed.log().splitlines() if "not a loopback address" in line]
    assert len(lines) == 1, keyed.log()
    assert "PATCHLIFE_API_KEY_METADATA" in lines[0] and "PATCHLIFE_API_KEY_INFERENCE" not in lines[0]


def test_keys_hold_in_every_api_process(keyed: ServeChild) -> None:
    with httpx.Client(base_url=keyed.url, timeout=30) as client:
        for _ in range(6):  # new connections: the kernel spreads them over the API processes
            r = client.post("/classify", files={"file": ("a.png", PNG, "image/png")}, headers={"Connection": "close"})
            assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer"), r.text
            assert r.json()["error"]["code"] == "unauthorized"
        r = client.post("/classify", files={"file": ("a.png", PNG, "image/png")},
                        headers={"Authorization": f"Bearer {INFERENCE_KEY}"})
        assert r.status_code == 200, r.text
        assert client.get("/metrics").status_code == 401
        r = client.get("/metrics", headers={"Authorization": f"Bearer {METRICS_KEY}"})
        assert r.status_code == 200 and 'reason="unauthorized"' in r.text
        assert client.get("/v1/models").status_code == 200  # metadata: no key set, open
        assert client.get("/readyz").status_code == 200 and client.get("/").status_code == 200


def test_grpc_needs_the_inference_key(keyed: ServeChild) -> None:
    tg = pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] is not installed")
    from tritonclient.utils import InferenceServerException

    assert keyed.grpc_target is not None
    client = tg.InferenceServerClient(keyed.grpc_target)
    try:
        tensor = tg.InferInput("images", [1], "BYTES")
        tensor.set_data_from_numpy(np.array([PNG], dtype=np.object_))
        with pytest.raises(InferenceServerException) as info:
            client.infer("nano-test", [tensor])
        assert info.value.status() == "StatusCode.UNAUTHENTICATED"
        result = client.infer("nano-test", [tensor], headers={"authorization": f"Bearer {INFERENCE_KEY}"})
        assert result.as_numpy("labels").shape[0] == 1
    finally:
        client.close()


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/v2/health/ready"])
def test_head_on_a_kept_alive_connection(keyed: ServeChild, path: str) -> None:
    """The HEAD answer carries the GET's Content-Length and no body: the next answer on the same
    connection starts right after its headers."""
    sock = connect(keyed.url)
    try:
        sock.sendall(f"HEAD {path} HTTP/1.1\r\nHost: test\r\n\r\nGET {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
        data = b""
        while data.count(b"\r\n\r\n") < 2 and b"HTTP/1.1" not in data.partition(b"\r\n\r\n")[2]:
            chunk = sock.recv(65536)
            assert chunk, f"closed after {data!r}"
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        headers = dict(line.lower().split(b": ", 1) for line in head.split(b"\r\n")[1:])
        length = int(headers[b"content-length"])
        assert length > 0 and rest.startswith(b"HTTP/1.1 200"), rest  # no body between the two answers
        # the rest is the GET's answer, whole: read it through the usual reader from a fresh buffer
        second = connect(keyed.url)
        second.sendall(f"GET {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
        status, _, body = read_answer(second)
        second.close()
        assert status == 200 and len(body) == length
    finally:
        sock.close()


def test_tritonclient_http_sends_the_key_in_headers(keyed: ServeChild) -> None:
    """What docs/api.md#access-keys shows for Triton's HTTP client: ``headers=`` on each call."""
    th = pytest.importorskip("tritonclient.http", reason="tritonclient[http] is not installed")
    from tritonclient.utils import InferenceServerException

    client = th.InferenceServerClient(keyed.url.removeprefix("http://"))
    try:
        tensor = th.InferInput("images", [1], "BYTES")
        tensor.set_data_from_numpy(np.array([PNG], dtype=np.object_))
        with pytest.raises(InferenceServerException) as info:
            client.infer("nano-test", [tensor])
        assert "key" in str(info.value.message()) and info.value.status() == "401"
        result = client.infer("nano-test", [tensor], headers={"Authorization": f"Bearer {INFERENCE_KEY}"})
        assert result.as_numpy("labels").shape[0] == 1
    finally:
        client.close()
