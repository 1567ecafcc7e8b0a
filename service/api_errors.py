"""The base of every error the service answers (:class:`ApiError`: an HTTP status, a stable code, a
rejection reason), and the errors of reading an image.

They live beside the decoding code (``service/decode.py``), which runs in the API processes and, for
JPEGs decoded in batches on the model's device, in the model process too; the front end answers them
(``service/frontend/errors.py`` holds the rest and the handlers).
"""

from __future__ import annotations


class ApiError(Exception):
    """An error with an HTTP status, a stable code and (optionally) a rejection reason for metrics."""

    status: int = 400
    code: str = "bad_request"
    reason: str | None = None  # label of patchlife_rejected_requests_total, None: not counted here

    def __init__(self, message: str, *, status: int | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        self.headers = headers or {}


class BadImage(ApiError):
    """The bytes claim to be an image (or are sent as one) but do not decode: 400."""
    status, code, reason = 400, "bad_image", "bad_image"


class UnsupportedMediaType(ApiError):
    """The declared content type (of the body or of a part) is not one we accept: 415."""
    status, code, reason = 415, "unsupported_media_type", "unsupported_media_type"


class TooManyPixels(ApiError):
    """Decompression-bomb guard: width x height over the limit, found from the header alone."""
    status, code, reason = 413, "image_too_many_pixels", "image_too_many_pixels"
