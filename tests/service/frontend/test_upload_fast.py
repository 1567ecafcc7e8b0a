"""service/frontend/upload.py's one-image-part cut: whatever it returns is what python-multipart's parser
returns for the same body, and any body it does not take gets the parser's answer, errors included."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest
from starlette.requests import Request

from bench.photos import photo_jpeg
from service.api_errors import ApiError
from service.frontend import upload
from service.frontend.upload import Payload, UploadLimits, one_image_part, read_payload

B = b"XyZzy0123"
IMAGE = photo_jpeg(64, 64, seed=5)
LIMITS = UploadLimits(max_file_bytes=1 << 20, max_body_bytes=1 << 21, max_images=4)


def body(*parts: bytes, boundary: bytes = B, tail: bytes = b"\r\n") -> bytes:
    return b"".join(b"--" + boundary + b"\r\n" + p + b"\r\n" for p in parts) + b"--" + boundary + b"--" + tail


def part(name: bytes = b"file", filename: bytes | None = b"a.jpg", ctype: bytes | None = b"image/jpeg",
         data: bytes = IMAGE, extra: bytes = b"") -> bytes:
    disposition = b'Content-Disposition: form-data; name="' + name + b'"'
    if filename is not None:
        disposition += b'; filename="' + filename + b'"'
    head = disposition + b"\r\n" + (b"Content-Type: " + ctype + b"\r\n" if ctype is not None else b"") + extra
    return head + b"\r\n" + data


GOOD = {
    "file": body(part()),
    "files": body(part(name=b"files")),
    "no filename": body(part(filename=None)),
    "no content type": body(part(ctype=None)),
    "octet-stream": body(part(ctype=b"application/octet-stream")),
    "folders in the filename": body(part(filename=b"C:\\\\photos\\\\cat.jpg")),
    "no CRLF after the close": body(part(), tail=b""),
    "lower-case, spaced headers": body(b'content-disposition:   form-data; name="file"\r\ncontent-type:image/png'
                                       b"\r\n\r\n" + IMAGE),
    "an extra header": body(part(extra=b"X-Note: hello\r\n")),
    "data with a partial delimiter": body(part(data=IMAGE + b"\r\n--" + B[:4] + b"tail")),
    "empty data": body(part(data=b"")),
}
OTHER = {  # bodies the cut leaves to the parser: some fine, some refused
    "two images": body(part(), part(name=b"files")),
    "an option field": body(part(), b'Content-Disposition: form-data; name="top_k"\r\n\r\n3'),
    "only an option": body(b'Content-Disposition: form-data; name="top_k"\r\n\r\n3'),
    "unknown field": body(part(name=b"photo")),
    "no name": body(b"Content-Disposition: form-data\r\nContent-Type: image/jpeg\r\n\r\n" + IMAGE),
    "no content disposition": body(b"Content-Type: image/jpeg\r\n\r\n" + IMAGE),
    "text/plain": body(part(ctype=b"text/plain")),
    "a preamble": b"hello\r\n" + body(part()),
    "leading CRLF": b"\r\n" + body(part()),
    "an epilogue": body(part(), tail=b"\r\nbye"),
    "no closing delimiter": body(part())[:-(len(B) + 6)],
    "a bad header name": body(part(extra=b"X Bad: 1\r\n")),
    "a header without colon": body(part(extra=b"Nonsense\r\n")),
    "a duplicate header": body(part(extra=b"Content-Type: image/png\r\n")),
    "a bare LF in a header": body(part(extra=b"X-A: 1\nX-B: 2\r\n")),
    "no headers": body(b"\r\n" + IMAGE),
    "another boundary": body(part(), boundary=b"other"),
    "the delimiter in the data": body(part(data=IMAGE[:100] + b"\r\n--" + B + b"\r\n" + IMAGE[100:])),
    "empty": b"",
}


def outcome(data: bytes, limits: UploadLimits, chunks: list[bytes]) -> Any:
    """read_payload's Payload, or the (type, status, message) of what it raised."""
    headers = [(b"content-type", b"multipart/form-data; boundary=" + B), (b"content-length", str(len(data)).encode())]
    scope = {"type": "http", "method": "POST", "path": "/classify", "headers": headers, "query_string": b""}
    messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]

    async def receive() -> dict[str, Any]:
        return messages.pop(0)

    try:
        return asyncio.run(read_payload(Request(scope, receive), limits))
    except ApiError as exc:
        return type(exc).__name__, exc.status, exc.message


def both_ways(data: bytes, limits: UploadLimits = LIMITS) -> tuple[Any, Any]:
    """(whole in one chunk: the cut may take it, split in two: always the parser)."""
    split = max(1, len(data) // 2)
    return outcome(data, limits, [data]), outcome(data, limits, [data[:split], data[split:]])


@pytest.mark.parametrize("name", sorted(GOOD))
def test_a_lone_image_part_is_cut_as_the_parser_reads_it(name: str) -> None:
    image = one_image_part(GOOD[name], B, LIMITS)
    assert image is not None
    whole, parsed = both_ways(GOOD[name])
    assert isinstance(parsed, Payload) and parsed == whole == Payload([image], {})


@pytest.mark.parametrize("name", sorted(OTHER))
def test_anything_else_is_left_to_the_parser(name: str) -> None:
    assert one_image_part(OTHER[name], B, LIMITS) is None
    whole, parsed = both_ways(OTHER[name])
    assert whole == parsed


@pytest.mark.parametrize(("limits", "error"), [
    (UploadLimits(max_file_bytes=len(IMAGE) - 1, max_body_bytes=1 << 21, max_images=4), "TooLarge"),
    (UploadLimits(max_file_bytes=1 << 20, max_body_bytes=1 << 21, max_images=0), "TooManyImages"),
])
def test_limits_are_the_parsers_answer(limits: UploadLimits, error: str) -> None:
    assert one_image_part(GOOD["file"], B, limits) is None
    whole, parsed = both_ways(GOOD["file"], limits)
    assert whole == parsed and whole[0] == error


def test_the_cut_is_what_classify_uses(monkeypatch: pytest.MonkeyPatch) -> None:
    """A whole one-image body does not reach python-multipart at all."""
    def refuse(*args: Any, **kw: Any) -> None:
        raise AssertionError("the parser ran")

    image = one_image_part(GOOD["file"], B, LIMITS)
    assert image is not None
    monkeypatch.setattr(upload.MultipartParser, "write", refuse)
    assert outcome(GOOD["file"], LIMITS, [GOOD["file"]]) == Payload([image], {})


def mutations(seed: int, count: int) -> list[bytes]:
    """Good bodies with a byte changed, inserted or removed near their structure (heads and ends)."""
    rng, out = random.Random(seed), []
    alphabet = b'\r\n-:;=" \taZ0' + B[:3]
    for _ in range(count):
        data = bytearray(rng.choice(sorted(GOOD.values())))
        heads = [i for i in range(len(data)) if i < 200 or i >= len(data) - len(B) - 12]
        at = rng.choice(heads)
        what = rng.randrange(3)
        if what == 0:
            data[at] = rng.choice(alphabet)
        elif what == 1:
            data.insert(at, rng.choice(alphabet))
        else:
            del data[at]
        out.append(bytes(data))
    return out


@pytest.mark.parametrize("seed", range(4))
def test_mangled_bodies_get_the_parsers_answer(seed: int) -> None:
    taken = 0
    for data in mutations(seed, 150):
        whole, parsed = both_ways(data)
        assert whole == parsed, data[:200]
        taken += one_image_part(data, B, LIMITS) is not None
    assert taken > 0  # some mutations (in the data, a filename) still leave one good part
