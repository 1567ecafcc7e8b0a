"""A large v2 answer is encoded off the event loop (issue 34: a 118 MB answer encoded on it stalled /healthz
of its process for 4.5 s); a small one is encoded in place (a thread hop would cost more than it)."""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import pytest
from fastapi.testclient import TestClient
from service_support import encode, photo

from service.frontend import oip
from service.frontend.routes import v2

INFER = "/v2/models/nano-test/infer"


def infer(client: TestClient, images: int, outputs: list[str] | None) -> None:
    data = [base64.b64encode(encode(photo(seed=i), "PNG")).decode() for i in range(images)]
    body: dict[str, Any] = {"inputs": [{"name": "images", "datatype": "BYTES", "shape": [images], "data": data}]}
    if outputs is not None:
        body["outputs"] = [{"name": name} for name in outputs]
    r = client.post(INFER, json=body)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(("images", "outputs", "on_loop"), [(1, None, True), (4, None, False),
                                                             (2, ["lifespans"], True), (4, ["budget"], True)])
def test_large_answers_are_encoded_off_the_event_loop(client: TestClient, monkeypatch: pytest.MonkeyPatch,
                                                      images: int, outputs: list[str] | None, on_loop: bool) -> None:
    seen: list[bool] = []
    real = oip.encode_response

    def spy(*args: Any) -> Any:
        try:
            asyncio.get_running_loop()
            seen.append(True)
        except RuntimeError:  # a worker thread: no loop runs here
            seen.append(False)
        return real(*args)

    monkeypatch.setattr(oip, "encode_response", spy)
    infer(client, images, outputs)
    assert seen == [on_loop], seen
    assert 4 < v2.INLINE_ENCODE_UNITS < 4 * 4  # 1 image x 4 outputs in place, 4 x 4 off the loop
