"""The single-process service: the front end's app with the model in this process.

``create_app(settings)`` is what tests, notebooks and ``PATCHLIFE_API_PROCESSES=0`` serve; the
multi-process service (``service/serve.py``) gives each API process a transport client instead.
"""

from __future__ import annotations

from fastapi import FastAPI

from .frontend.app import make_app
from .metrics import Metrics
from .runtime.engine import Engine
from .runtime.local import LocalModel
from .settings import Settings, get_settings


def create_app(settings: Settings | None = None, engine: Engine | None = None) -> FastAPI:
    """The app with an in-process model. ``engine``: an already loaded engine (``patchlife serve``
    loads it before the port opens); None: the lifespan loads it."""
    settings = settings or get_settings()
    metrics = Metrics()
    return make_app(settings, LocalModel(settings, metrics, engine), metrics)
