"""The API process's own state: :class:`FrontendState`, one per front end (``app.state.frontend``).

What a front end knows and decides by itself, whichever transport asks (REST routes, gRPC): the
model behind its typed handle (:class:`~service.protocol.ModelClient`, in this process or another)
and the card it opened, the settings and the limits they set, this front end's lifecycle (one state;
see :class:`~service.protocol.Lifecycle`), its requests in flight, its decode budget and its access
keys. It runs nothing: the request pipeline (``service/frontend/pipeline.py``) does, reading this.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from ..metrics import Metrics
from ..preprocess import Preprocessor
from ..protocol import Lifecycle, ModelCard, ModelClient, ModelStatus, advance
from ..settings import Settings
from .access import Keys
from .context import InFlight
from .decode_gate import DecodeGate, decode_capacity
from .errors import NotReady, ShuttingDown
from .upload import UploadLimits


@dataclass
class FrontendState:
    """Everything the routes and the gRPC service read; the card is set by the app's lifespan."""

    settings: Settings
    metrics: Metrics
    model: ModelClient
    card: ModelCard | None = None
    state: Lifecycle = Lifecycle.LOADING
    startup_error: str | None = None
    shared_ports: bool = False  # one of several API processes on the same ports
    in_flight: InFlight = field(default_factory=InFlight)
    decode_gate: DecodeGate = field(init=False)
    keys: Keys = field(init=False)  # the access keys' digests (service/frontend/access.py)
    _preprocessor: Preprocessor | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.decode_gate = DecodeGate(decode_capacity(self.settings.max_decode_pixels))
        self.keys = Keys.from_settings(self.settings)

    @property
    def draining(self) -> bool:
        """New requests are refused (503, Connection: close)."""
        return Lifecycle.DRAINING <= self.state <= Lifecycle.STOPPED

    @property
    def grace_over(self) -> bool:
        """The drain's grace ended: requests still decoding or uploading stop (503)."""
        return Lifecycle.GRACE_OVER <= self.state <= Lifecycle.STOPPED

    def advance(self, state: Lifecycle) -> None:
        """Move forward only (:func:`service.protocol.advance`, the one rule): a late event (a warm-up
        ending during the drain) never undoes a later state."""
        self.state = advance(self.state, state)

    def preprocessor(self) -> Preprocessor:
        if self._preprocessor is None:
            self._preprocessor = Preprocessor(self.loaded().preprocess)
        return self._preprocessor

    def loaded(self) -> ModelCard:
        """The card, or 503 while the model is loading."""
        if self.card is None:
            raise NotReady("model is loading")
        return self.card

    def not_ready_reason(self) -> str | None:
        """Why /readyz says 503 (None when ready): loading, failed, shutting down, or a model that cannot
        serve (its thread died, batches keep failing, a batch hangs, its process is gone)."""
        if self.state >= Lifecycle.STOPPING and self.state != Lifecycle.FAILED:
            return "server is shutting down"
        if self.state != Lifecycle.READY:
            return f"model failed to start: {self.startup_error}" if self.startup_error else "model is loading"
        return self.model.status().problem

    def check_ready(self) -> ModelStatus:
        """Raise what /readyz answers (NotReady, ShuttingDown) unless the model can serve."""
        if self.state >= Lifecycle.STOPPING and self.state != Lifecycle.FAILED:
            raise ShuttingDown("server is shutting down; retry on another instance")
        if self.state != Lifecycle.READY:
            msg = f"model failed to start: {self.startup_error}" if self.startup_error else \
                "model is loading or warming up; retry shortly"
            raise NotReady(msg)
        status = self.model.status()
        if status.problem is not None:
            raise NotReady(f"model unavailable: {status.problem}", headers={"Retry-After": "5"})
        return status

    def serving(self) -> ModelCard:
        """For inference routes: requests are served until the drain, even while /readyz says 503
        (stopping, or an unhealthy model whose batches answer 503 themselves)."""
        if self.draining:  # the model never sees this request: count it here
            self.metrics.reject("shutdown")
            raise ShuttingDown("server is shutting down; retry on another instance")
        if self.card is None or self.state not in (Lifecycle.READY, Lifecycle.STOPPING):
            raise NotReady("model is loading or warming up; retry shortly" if self.startup_error is None else
                           f"model failed to start: {self.startup_error}")
        return self.card

    def clock(self) -> Callable[[], float]:
        return self.model.clock

    def limits(self, max_images: int | None = None) -> UploadLimits:
        s = self.settings
        return UploadLimits(s.max_upload_bytes, s.max_request_bytes, max_images or s.max_images_per_request)
