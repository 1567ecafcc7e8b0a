"""The model's refusals as API errors: one table by :class:`ErrorKind` (``errors.REFUSALS``) gives each
the status, code, headers and message it was answered with when each class had its own ``except``."""

from __future__ import annotations

import pytest

from service.frontend.errors import REFUSALS, error_body, refusal
from service.protocol import (
    BadInput,
    Cancelled,
    DeadlinePassed,
    ErrorKind,
    ModelFailed,
    QueueFull,
    WorkerError,
    WorkerStopping,
)

HINT = "(X-Request-Deadline-Ms or PATCHLIFE_DEADLINE_MS)"
CASES: list[tuple[WorkerError, int, str, dict[str, str], str]] = [
    (QueueFull(2.5, "queue is full"), 503, "overloaded", {"Retry-After": "3"}, "queue is full"),
    (QueueFull(0.1), 503, "overloaded", {"Retry-After": "1"}, "server overloaded; retry after 0.1 s"),
    (DeadlinePassed("the deadline passed while the request was queued"), 504, "deadline_exceeded", {},
     f"the deadline passed while the request was queued {HINT}"),
    (WorkerStopping("server is shutting down"), 503, "shutting_down", {"Connection": "close"},
     "server is shutting down"),
    (ModelFailed("model unavailable: boom", 5.0), 503, "model_unavailable", {"Retry-After": "5"},
     "model unavailable: boom"),
    (BadInput("files[0]: not a JPEG"), 400, "bad_image", {}, "files[0]: not a JPEG"),
    (Cancelled("cancelled by the API process"), 499, "client_disconnected", {}, "cancelled by the API process"),
]


def test_every_kind_has_an_answer() -> None:
    assert set(REFUSALS) == set(ErrorKind)


@pytest.mark.parametrize(("exc", "status", "code", "headers", "message"), CASES, ids=lambda c: getattr(c, "kind", ""))
def test_a_refusal_is_answered_as_before(exc: WorkerError, status: int, code: str, headers: dict[str, str],
                                         message: str) -> None:
    api = refusal(exc, HINT)
    assert (api.status, api.code, api.headers, api.message) == (status, code, headers, message)
    assert error_body(api.code, api.message) == {"error": {"code": code, "message": message}}
