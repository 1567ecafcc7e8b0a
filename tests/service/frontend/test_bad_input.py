"""Every kind of bad input: the right 4xx, one JSON error shape, a rejection counted, never a 500,
and the server stays healthy (the next good request succeeds)."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
from collections.abc import Callable
from typing import Any

import pytest
from fastapi.testclient import TestClient
from service_support import encode, photo, png_bomb
from starlette.requests import Request

from service.frontend.errors import TooLarge
from service.frontend.upload import UploadLimits, read_payload

GOOD = encode(photo((40, 40)), "PNG")
B64 = base64.b64encode(GOOD).decode()
BIG = b"\xff\xd8" + b"\x00" * 300_000  # over the tests' 200 kB upload limit
TRUNCATED_JPEG = encode(photo((64, 64)), "JPEG")[:400]


def files(*parts: tuple[str, bytes, str]) -> dict[str, Any]:
    return {"files": [(name, (f"{i}.bin", data, ctype)) for i, (name, data, ctype) in enumerate(parts)]}


def raw(body: bytes, ctype: str | None) -> dict[str, Any]:
    return {"content": body, "headers": {"content-type": ctype} if ctype else {}}


# (id, request kwargs, status, code, counted reason)
CASES: list[tuple[str, dict[str, Any], int, str, str | None]] = [
    ("text-bytes-as-png", files(("file", b"not an image at all", "image/png")), 400, "bad_image", "bad_image"),
    ("truncated-jpeg", files(("file", TRUNCATED_JPEG, "image/jpeg")), 400, "bad_image", "bad_image"),
    ("empty-file", files(("file", b"", "image/png")), 400, "bad_image", "bad_image"),
    ("garbage-raw-body", raw(b"\x00\x01garbage", "application/octet-stream"), 400, "bad_image", "bad_image"),
    ("second-image-bad", files(("files", GOOD, "image/png"), ("files", b"junk", "image/png")), 400, "bad_image",
     "bad_image"),
    ("text-part", files(("file", b"hello", "text/plain")), 415, "unsupported_media_type", "unsupported_media_type"),
    ("text-body", raw(b"hello", "text/plain"), 415, "unsupported_media_type", "unsupported_media_type"),
    ("no-content-type", raw(GOOD, None), 415, "unsupported_media_type", "unsupported_media_type"),
    ("form-urlencoded", {"data": {"file": "x"}}, 415, "unsupported_media_type", "unsupported_media_type"),
    ("data-url-text", {"json": {"images": ["data:text/plain;base64,aGVsbG8="]}}, 415, "unsupported_media_type",
     "unsupported_media_type"),
    ("no-image-field", {"files": {"top_k": (None, "3")}}, 422, "invalid_request", "invalid_request"),
    ("unknown-field", files(("file", GOOD, "image/png"), ("picture", GOOD, "image/png")), 422, "invalid_request",
     "invalid_request"),
    ("duplicate-top-k", {"files": [("file", ("a.png", GOOD, "image/png")), ("top_k", (None, "1")),
                                   ("top_k", (None, "2"))]}, 422, "invalid_request", "invalid_request"),
    ("json-no-images", {"json": {"top_k": 3}}, 422, "invalid_request", "invalid_request"),
    ("json-empty-images", {"json": {"images": []}}, 422, "invalid_request", "invalid_request"),
    ("json-images-not-list", {"json": {"images": B64}}, 422, "invalid_request", "invalid_request"),
    ("json-extra-key", {"json": {"images": [B64], "colour": "red"}}, 422, "invalid_request", "invalid_request"),
    ("json-syntax", raw(b'{"images": [', "application/json"), 400, "invalid_request", "invalid_request"),
    ("json-not-base64", {"json": {"images": ["@@@not base64@@@"]}}, 400, "bad_image", "bad_image"),
    ("json-base64-not-image", {"json": {"images": [base64.b64encode(b"hello").decode()]}}, 400, "bad_image",
     "bad_image"),
    ("multipart-no-boundary", raw(b"--x\r\n", "multipart/form-data"), 400, "invalid_request", "invalid_request"),
    ("multipart-unterminated", raw(b'--b\r\nContent-Disposition: form-data; name="file"; filename="a"\r\n\r\nabc',
                                   "multipart/form-data; boundary=b"), 400, "invalid_request", "invalid_request"),
    ("file-too-large", files(("file", BIG, "image/jpeg")), 413, "too_large", "too_large"),
    ("raw-too-large", raw(BIG, "image/jpeg"), 413, "too_large", "too_large"),
    ("json-image-too-large", {"json": {"images": [base64.b64encode(BIG).decode()[:1_000_000 - 20]]}}, 413,
     "too_large", "too_large"),
    ("body-too-large", raw(b"0" * 1_100_000, "application/json"), 413, "too_large", "too_large"),
    ("decompression-bomb", files(("file", png_bomb(), "image/png")), 413, "image_too_many_pixels",
     "image_too_many_pixels"),
    ("too-many-files", files(*[("files", GOOD, "image/png")] * 5), 413, "too_many_images", "too_many_images"),
    ("too-many-json", {"json": {"images": [B64] * 5}}, 413, "too_many_images", "too_many_images"),
    ("top-k-zero", {**files(("file", GOOD, "image/png")), "params": {"top_k": 0}}, 422, "invalid_request",
     "invalid_request"),
    ("top-k-over-max", {**files(("file", GOOD, "image/png")), "params": {"top_k": 6}}, 422, "invalid_request",
     "invalid_request"),
    ("top-k-text", {**files(("file", GOOD, "image/png")), "params": {"top_k": "abc"}}, 422, "invalid_request",
     "invalid_request"),
    ("top-k-form-float", {"files": [("file", ("a.png", GOOD, "image/png")), ("top_k", (None, "2.5"))]}, 422,
     "invalid_request", "invalid_request"),
    ("top-k-json-negative", {"json": {"images": [B64], "top_k": -1}}, 422, "invalid_request", "invalid_request"),
    ("top-k-conflict", {**files(("file", GOOD, "image/png")), "params": {"top_k": 1}, "data": {"top_k": "2"}},
     422, "invalid_request", "invalid_request"),
    ("keep-rate-zero", {**files(("file", GOOD, "image/png")), "params": {"keep_rate": 0}}, 422,
     "invalid_request", "invalid_request"),
    ("keep-rate-above-one", {"json": {"images": [B64], "keep_rate": 1.5}}, 422, "invalid_request",
     "invalid_request"),
    ("keep-rate-nan", {"files": [("file", ("a.png", GOOD, "image/png")), ("keep_rate", (None, "nan"))]}, 422,
     "invalid_request", "invalid_request"),
    ("keep-rate-text", {**files(("file", GOOD, "image/png")), "params": {"keep_rate": "lots"}}, 422,
     "invalid_request", "invalid_request"),
    ("deadline-text", {**files(("file", GOOD, "image/png")), "headers": {"X-Request-Deadline-Ms": "soon"}}, 422,
     "invalid_request", "invalid_request"),
    ("deadline-negative", {**files(("file", GOOD, "image/png")), "headers": {"X-Request-Deadline-Ms": "-5"}},
     422, "invalid_request", "invalid_request"),
]


@pytest.mark.parametrize(("kwargs", "status", "code", "reason"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(client: TestClient, metric: Callable[..., float], kwargs: dict[str, Any], status: int,
                   code: str, reason: str | None) -> None:
    before = metric(client, "patchlife_rejected_requests_total", {"reason": reason}) if reason else 0.0
    r = client.post("/classify", **kwargs)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code and isinstance(err["message"], str) and len(err["message"]) > 5
    if reason:
        assert metric(client, "patchlife_rejected_requests_total", {"reason": reason}) == before + 1
    ok = client.post("/classify", files={"file": ("ok.png", GOOD, "image/png")})
    assert ok.status_code == 200 and client.get("/readyz").status_code == 200


def test_content_length_refused_before_reading(client: TestClient) -> None:
    # the header alone decides: the (short) body that follows is never looked at
    r = client.post("/classify", content=b"x", headers={"content-type": "application/json",
                                                        "content-length": "2000000"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"


def test_explain_bad_inputs(client: TestClient) -> None:
    r = client.post("/explain", files=files(("files", GOOD, "image/png"), ("files", GOOD, "image/png"))["files"])
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_many_images"
    r = client.post("/explain", files={"file": ("a.png", GOOD, "image/png")}, params={"format": "gif"})
    assert r.status_code == 422 and r.json()["error"]["details"][0]["field"] == "format"
    r = client.post("/explain", files={"file": ("a.png", b"junk", "image/png")})
    assert r.status_code == 400 and r.json()["error"]["code"] == "bad_image"


@pytest.mark.parametrize(("method", "path", "status", "code"), [
    ("GET", "/nowhere", 404, "not_found"), ("GET", "/classify", 405, "method_not_allowed"),
    ("DELETE", "/healthz", 405, "method_not_allowed")])
def test_unknown_routes_use_the_error_shape(client: TestClient, method: str, path: str, status: int,
                                            code: str) -> None:
    r = client.request(method, path)
    assert r.status_code == status and r.json()["error"]["code"] == code


def test_genuine_bug_is_a_json_500(make_client: Callable[..., TestClient]) -> None:
    c = make_client()
    rt = c.app.state.frontend  # type: ignore[attr-defined]
    rt.card, rt._preprocessor = dataclasses.replace(rt.card, preprocess=None), None  # a bug, not bad input
    c2 = TestClient(c.app, raise_server_exceptions=False)
    r = c2.post("/classify", files={"file": ("a.png", GOOD, "image/png")}, headers={"X-Request-ID": "bug-1"})
    assert r.status_code == 500 and r.json() == {"error": {"code": "internal_error",
                                                           "message": "internal server error; see the server log"}}
    # the front door's other wrappers still see it: request id, Connection: close, counted as a 500
    assert r.headers["x-request-id"] == "bug-1" and r.headers["connection"] == "close"
    count = rt.metrics.registry.get_sample_value("patchlife_http_request_duration_seconds_count",
                                                 {"route": "/classify", "method": "POST", "status": "500"})
    assert count == 1 and rt.in_flight.count == 0


class EndlessBody:
    """An ASGI ``receive`` that never ends the body; counts the chunks pulled."""

    def __init__(self, first: bytes = b"") -> None:
        self.first, self.pulled = first, 0

    async def __call__(self) -> dict[str, Any]:
        self.pulled += 1
        body = self.first if self.pulled == 1 and self.first else b"\x00" * 65_536
        return {"type": "http.request", "body": body, "more_body": True}


@pytest.mark.parametrize(("ctype", "first", "limit"), [
    (b"multipart/form-data; boundary=zz",
     b'--zz\r\nContent-Disposition: form-data; name="file"; filename="a"\r\n\r\n', 1_000_000),
    (b"application/json", b"", 5_000_000),
    (b"image/jpeg", b"", 1_000_000)])
def test_upload_stops_reading_past_the_limit(ctype: bytes, first: bytes, limit: int) -> None:
    """The body is pulled chunk by chunk and abandoned at the limit, not read whole first."""
    receive = EndlessBody(first)
    scope = {"type": "http", "method": "POST", "path": "/classify", "headers": [(b"content-type", ctype)]}
    with pytest.raises(TooLarge):
        asyncio.run(read_payload(Request(scope, receive), UploadLimits(1_000_000, 5_000_000, 4)))
    assert limit // 65_536 <= receive.pulled <= limit // 65_536 + 2
