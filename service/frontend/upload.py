"""Request body -> raw images and option fields, streamed under byte limits (never read whole first).

Accepted bodies (by Content-Type):
  * ``multipart/form-data``: image parts named ``file`` or ``files`` (any number up to the limit),
    optional text fields ``top_k`` and ``keep_rate``. Parsed chunk by chunk as the body arrives with
    python-multipart's push parser into memory: a part stops being read as soon as it passes
    ``max_upload_bytes`` and the body as soon as it passes ``max_request_bytes`` (413), and an image
    part past ``max_images`` stops the read too (413). Nothing is spooled to disk.
  * ``application/json``: ``{"images": ["<base64 or data URL>", ...], "top_k": 5, "keep_rate": 0.7}``;
    the body is read up to ``max_request_bytes``, each image's decoded size is checked before decoding.
  * ``image/*`` or ``application/octet-stream``: the body is one image (``curl --data-binary``).
A Content-Length over the body limit is refused before a byte is read.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import anyio
from pydantic import ValidationError
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request

from ..decode import check_media_type
from .errors import (
    ApiError,
    BadImage,
    InvalidRequest,
    TooLarge,
    TooManyImages,
    UnsupportedMediaType,
    UploadAbandoned,
    invalid_json,
)
from .schemas import ImagesJson

IMAGE_FIELDS = ("file", "files")
OPTION_FIELDS = ("top_k", "keep_rate", "min_keep_rate")
MAX_FIELD_BYTES = 256


@dataclass(frozen=True)
class UploadLimits:
    max_file_bytes: int
    max_body_bytes: int
    max_images: int


@dataclass
class RawImage:
    data: bytes
    content_type: str | None  # as declared by the client; None when not declared
    source: str  # how error messages name it: the file's name, else "files[1]", "images[0]", "body"


@dataclass
class Payload:
    images: list[RawImage]
    options: dict[str, Any] = field(default_factory=dict)  # top_k / keep_rate as sent (str or JSON value)


async def read_payload(request: Request, limits: UploadLimits) -> Payload:
    """Dispatch on the Content-Type; raise ``ApiError`` subclasses on anything wrong."""
    declared = request.headers.get("content-type")
    if not declared:
        raise UnsupportedMediaType("missing Content-Type: send multipart/form-data, application/json "
                                   "or an image/* body")
    media = parse_options_header(declared)[0].decode("latin-1").lower()
    _check_content_length(request, limits.max_body_bytes)
    if media == "multipart/form-data":
        return await _read_multipart(request, declared, limits)
    if media == "application/json" or media.endswith("+json"):
        return await _read_json(request, limits)
    if media.startswith("image/") or media == "application/octet-stream":
        body = await _read_body(request, limits.max_file_bytes, "image body")
        return Payload([RawImage(body, media, "body")])
    raise UnsupportedMediaType(f"Content-Type {media!r} is not accepted: send multipart/form-data "
                               "(fields file/files), application/json ({\"images\": [base64...]}) or an "
                               "image/* body")


def _check_content_length(request: Request, limit: int) -> None:
    value = request.headers.get("content-length")
    if value and value.isdigit() and int(value) > limit:
        raise TooLarge(f"request body is {int(value)} bytes, over the limit of {limit} bytes "
                       "(PATCHLIFE_MAX_REQUEST_BYTES)")


async def _stream(request: Request, limit: int, what: str) -> AsyncIterator[bytes]:
    """The body's chunks; a client that leaves before its end is a client event (499), not a bug."""
    total = 0
    try:
        async for chunk in request.stream():
            total += len(chunk)
            if total > limit:
                raise TooLarge(f"{what} is over the limit of {limit} bytes")
            yield chunk
    except ClientDisconnect:
        raise UploadAbandoned(f"the client closed the connection after {total} bytes of its body") from None


async def _read_body(request: Request, limit: int, what: str) -> bytes:
    return b"".join([chunk async for chunk in _stream(request, limit, what)])  # one copy of the body


# -- multipart -----------------------------------------------------------------------------------
class _Parts:
    """python-multipart callbacks collecting image parts and option fields under the limits."""

    def __init__(self, limits: UploadLimits) -> None:
        self.limits = limits
        self.images: list[RawImage] = []
        self.options: dict[str, str] = {}
        self.finished = False
        self._header = [b"", b""]
        self._headers: dict[bytes, bytes] = {}
        self._name = ""
        self._filename: str | None = None
        self._chunks: list[bytes | memoryview] = []  # the part's data: views into the body's chunks, joined once
        self._size = 0
        self._counts: dict[str, int] = {}

    def callbacks(self) -> dict[str, Any]:
        return {"on_part_begin": self.part_begin, "on_header_field": self.header_field,
                "on_header_value": self.header_value, "on_header_end": self.header_end,
                "on_headers_finished": self.headers_finished, "on_part_data": self.part_data,
                "on_part_end": self.part_end, "on_end": self.end}

    def part_begin(self) -> None:
        self._headers, self._chunks, self._size, self._header = {}, [], 0, [b"", b""]

    def header_field(self, data: bytes, start: int, end: int) -> None:
        self._header[0] += data[start:end]

    def header_value(self, data: bytes, start: int, end: int) -> None:
        self._header[1] += data[start:end]

    def header_end(self) -> None:
        self._headers[self._header[0].strip().lower()] = self._header[1].strip()
        self._header = [b"", b""]

    def headers_finished(self) -> None:
        _, params = parse_options_header(self._headers.get(b"content-disposition", b""))
        if b"name" not in params:
            raise InvalidRequest("a multipart part has no name in its Content-Disposition", status=400)
        name = self._name = params[b"name"].decode("utf-8", "replace")
        self._filename = shown_filename(params.get(b"filename"))
        if name in IMAGE_FIELDS:
            if len(self.images) >= self.limits.max_images:
                raise TooManyImages(f"more than {self.limits.max_images} images in one request "
                                    "(PATCHLIFE_MAX_IMAGES_PER_REQUEST)")
            ctype = self._headers.get(b"content-type")
            check_media_type(ctype.decode("latin-1") if ctype else None, self._source())
        elif name in OPTION_FIELDS:
            if name in self.options:
                raise InvalidRequest(f"form field {name!r} given twice")
        else:
            raise InvalidRequest(f"unknown form field {name!r}: expected file or files (images), "
                                 "top_k, keep_rate, min_keep_rate")

    def _source(self) -> str:
        """The file's name as the client sent it, else the part's place (``files[1]``)."""
        return self._filename or f"{self._name}[{self._counts.get(self._name, 0)}]"

    def part_data(self, data: bytes, start: int, end: int) -> None:
        self._size += end - start
        if self._name in IMAGE_FIELDS:
            if self._size > self.limits.max_file_bytes:
                raise TooLarge(f"{self._source()} is over the limit of {self.limits.max_file_bytes} bytes "
                               "(PATCHLIFE_MAX_UPLOAD_BYTES)")
        elif self._size > MAX_FIELD_BYTES:
            raise InvalidRequest(f"form field {self._name!r} is longer than {MAX_FIELD_BYTES} bytes")
        # a multi-MB image arrives in ~64 kB chunks: keep views of them (bytes never change) and copy once
        self._chunks.append(memoryview(data)[start:end] if type(data) is bytes else bytes(data[start:end]))

    def part_end(self) -> None:
        if self._name in IMAGE_FIELDS:
            ctype = self._headers.get(b"content-type")
            self.images.append(RawImage(b"".join(self._chunks), ctype.decode("latin-1") if ctype else None,
                                        self._source()))
            self._counts[self._name] = self._counts.get(self._name, 0) + 1
        else:
            self.options[self._name] = b"".join(self._chunks).decode("utf-8", "replace").strip()

    def end(self) -> None:
        self.finished = True


def shown_filename(raw: bytes | None, limit: int = 80) -> str | None:
    """A multipart part's filename fit for a message: printable, at most ``limit`` characters, the
    folders a browser may send dropped; None when there is none."""
    if not raw:
        return None
    name = raw.decode("utf-8", "replace").replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(ch for ch in name if ch.isprintable()).strip()
    if not name:
        return None
    return name if len(name) <= limit else name[:limit - 1] + "…"


async def _read_multipart(request: Request, declared: str, limits: UploadLimits) -> Payload:
    """python-multipart's push parser, chunk by chunk; a body that comes whole in its first chunk and
    is one image part and nothing else (the common upload) is cut by :func:`one_image_part` instead."""
    _, params = parse_options_header(declared)
    boundary = params.get(b"boundary")
    if not boundary:
        raise InvalidRequest("multipart/form-data without a boundary parameter", status=400)
    parts = _Parts(limits)
    whole = request.headers.get("content-length")
    length = int(whole) if whole and whole.isdigit() else -1
    image: RawImage | None = None  # the one image part of a body that came whole in its first chunk
    first, seen = b"", 0
    try:
        parser = MultipartParser(boundary, parts.callbacks())  # type: ignore[arg-type]
        async for chunk in _stream(request, limits.max_body_bytes,
                                   "request body (PATCHLIFE_MAX_REQUEST_BYTES)"):
            if seen == 0 and len(chunk) == length:
                image, first = one_image_part(chunk, boundary, limits), chunk
            elif image is not None and chunk:  # past Content-Length (HTTP's framing forbids it): the parser decides
                parser.write(first)
                image = None
            seen += len(chunk)
            if image is None:
                parser.write(chunk)
        if image is not None:
            return Payload([image], {})
        parser.finalize()
    except FormParserError as exc:
        raise InvalidRequest(f"malformed multipart body: {exc}", status=400) from None
    if not parts.finished:
        raise InvalidRequest("multipart body ended before its closing boundary", status=400)
    if not parts.images:
        raise InvalidRequest("no image: send the image in a multipart part named 'file' (or several "
                             "named 'files')")
    return Payload(parts.images, dict(parts.options))


HEADER_NAME = re.compile(rb"[A-Za-z0-9-]+")  # within python-multipart's token characters
MAX_PART_HEAD = 1024  # far under python-multipart's header size and count limits


def one_image_part(body: bytes, boundary: bytes, limits: UploadLimits) -> RawImage | None:
    """The image of a whole multipart body that is exactly one well-formed image part (``file`` or
    ``files``) within the limits, as :class:`_Parts` gets it from python-multipart; None for anything
    else (another field, several parts, a preamble or epilogue, an unusual or bad header, a refused
    media type, a size near a limit), which the parser then reads and answers as ever.

    python-multipart walks a part's headers in Python, calls back per header and per boundary match
    and parses the Content-Disposition once more: about 50 us of the event loop for a 224-px JPEG
    upload, where this is a few ``find`` calls. ``tests/service/frontend/test_upload_fast.py`` checks
    that what this returns is what the parser returns, on good and malformed bodies."""
    delimiter = b"--" + boundary
    start = len(delimiter) + 2
    if not body.startswith(delimiter + b"\r\n") or limits.max_images < 1:
        return None
    close = b"\r\n" + delimiter + b"--"
    end = len(body) - len(close) - (2 if body.endswith(b"\r\n") else 0)
    if end < start or body.find(close, end) != end or body.find(b"\r\n" + delimiter, start) != end:
        return None  # not one part ended by the closing delimiter (and by nothing, or one CRLF, after it)
    head_end = body.find(b"\r\n\r\n", start, start + MAX_PART_HEAD)
    if head_end < 0 or head_end + 4 > end:
        return None
    headers: dict[bytes, bytes] = {}
    for line in body[start:head_end].split(b"\r\n"):
        name, colon, value = line.partition(b":")
        key = name.lower()
        if not colon or not HEADER_NAME.fullmatch(name) or key in headers or b"\r" in value or b"\n" in value:
            return None
        headers[key] = value.strip()
    _, params = parse_options_header(headers.get(b"content-disposition", b""))
    field = params.get(b"name", b"").decode("utf-8", "replace")
    data = body[head_end + 4:end]
    if field not in IMAGE_FIELDS or len(data) > limits.max_file_bytes:
        return None
    ctype = headers.get(b"content-type")
    declared = ctype.decode("latin-1") if ctype else None
    source = shown_filename(params.get(b"filename")) or f"{field}[0]"
    try:
        check_media_type(declared, source)
    except ApiError:
        return None  # refused: the parser raises the same, in its own order
    return RawImage(data, declared, source)


# -- JSON ----------------------------------------------------------------------------------------
async def _read_json(request: Request, limits: UploadLimits) -> Payload:
    body = await _read_body(request, limits.max_body_bytes, "request body (PATCHLIFE_MAX_REQUEST_BYTES)")
    # validating and base64-decoding up to max_request_bytes takes a while: off the event loop
    return await anyio.to_thread.run_sync(parse_json_body, body, limits)


def parse_json_body(body: bytes, limits: UploadLimits) -> Payload:
    try:
        parsed = ImagesJson.model_validate_json(body)
    except ValidationError as exc:
        raise invalid_json(exc, "JSON body") from None
    if len(parsed.images) > limits.max_images:
        raise TooManyImages(f"{len(parsed.images)} images in one request, the limit is {limits.max_images} "
                            "(PATCHLIFE_MAX_IMAGES_PER_REQUEST)")
    images = [_from_base64(text, f"images[{i}]", limits.max_file_bytes) for i, text in enumerate(parsed.images)]
    options = {k: v for k, v in (("top_k", parsed.top_k), ("keep_rate", parsed.keep_rate),
                                 ("min_keep_rate", parsed.min_keep_rate)) if v is not None}
    return Payload(images, options)


def _from_base64(text: str, source: str, limit: int) -> RawImage:
    """Plain base64 or a ``data:image/...;base64,`` URL; whitespace (MIME line breaks) is ignored."""
    declared = None
    if text.startswith("data:"):
        header, sep, text = text.partition(",")
        if not sep or not header.endswith(";base64"):
            raise BadImage(f"{source}: a data URL must look like data:image/png;base64,<data>")
        declared = header[5:-7] or None
        check_media_type(declared, source)
    compact = "".join(text.split())
    if len(compact) // 4 * 3 > limit:
        raise TooLarge(f"{source} is over the limit of {limit} bytes (PATCHLIFE_MAX_UPLOAD_BYTES)")
    try:
        data = base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        raise BadImage(f"{source}: not valid base64") from None
    return RawImage(data, declared, source)
