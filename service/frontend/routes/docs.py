"""The API docs, ``/docs`` (Swagger UI) and ``/redoc`` (ReDoc), working with no network.

FastAPI's own pages load their scripts from a CDN, so on an air-gapped cluster they are blank. The
assets come instead from the ``fastapi-offline`` package (a runtime dependency: Swagger UI under
its Apache-2.0 licence, ReDoc under MIT, both as their projects publish them), found on disk
without importing it and served here by exact name only.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse
from starlette.exceptions import HTTPException

log = logging.getLogger("patchlife.docs")
router = APIRouter()

ASSETS_PACKAGE = "fastapi_offline"
ASSETS_URL = "/docs-assets"
_ASSET_TYPES = {"swagger-ui-bundle.js": "text/javascript; charset=utf-8", "swagger-ui.css": "text/css; charset=utf-8",
                "redoc.standalone.js": "text/javascript; charset=utf-8", "favicon.png": "image/png"}


def assets_dir() -> Path | None:
    """The folder holding the Swagger UI and ReDoc bundles, or None when the package is missing."""
    spec = importlib.util.find_spec(ASSETS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        log.warning("package %s is not installed: /docs and /redoc cannot load their scripts", ASSETS_PACKAGE)
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "static"
    return folder if all((folder / name).is_file() for name in _ASSET_TYPES) else None


ASSETS = assets_dir()
SWAGGER_PARAMETERS = {"validatorUrl": None}  # Swagger UI would ask validator.swagger.io about the spec
# Both pages may load from this server only (ReDoc's sidebar would fetch a logo from its CDN). Their
# bootstrap script and the styles their bundles inject are inline; ReDoc's search runs in a blob: worker.
DOCS_HEADERS = {"Content-Security-Policy": "default-src 'self'; script-src 'self' 'unsafe-inline'; "
                                           "style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
                                           "worker-src 'self' blob:; object-src 'none'; base-uri 'none'",
                "X-Content-Type-Options": "nosniff"}


def _with_headers(response: HTMLResponse) -> HTMLResponse:
    response.headers.update(DOCS_HEADERS)
    return response


def _base(request: Request) -> str:
    return str(request.scope.get("root_path", "")).rstrip("/")


@router.get("/docs", include_in_schema=False)
def swagger_ui(request: Request) -> HTMLResponse:
    base, extra = _base(request), request.app.swagger_ui_parameters or {}
    return _with_headers(get_swagger_ui_html(openapi_url=f"{base}{request.app.openapi_url}",
                               title=f"{request.app.title}: API (Swagger UI)",
                               swagger_js_url=f"{base}{ASSETS_URL}/swagger-ui-bundle.js",
                               swagger_css_url=f"{base}{ASSETS_URL}/swagger-ui.css",
                               swagger_favicon_url=f"{base}{ASSETS_URL}/favicon.png",
                               swagger_ui_parameters={**SWAGGER_PARAMETERS, **extra}))


@router.get("/redoc", include_in_schema=False)
def redoc(request: Request) -> HTMLResponse:
    base = _base(request)
    return _with_headers(get_redoc_html(openapi_url=f"{base}{request.app.openapi_url}",
                                        title=f"{request.app.title}: API (ReDoc)",
                                        redoc_js_url=f"{base}{ASSETS_URL}/redoc.standalone.js",
                          redoc_favicon_url=f"{base}{ASSETS_URL}/favicon.png",
                                        with_google_fonts=False))


@router.get(ASSETS_URL + "/{name}", include_in_schema=False)
def asset(name: str) -> FileResponse:
    if ASSETS is None or name not in _ASSET_TYPES:
        raise HTTPException(404, f"no docs asset named {name!r}")
    return FileResponse(ASSETS / name, media_type=_ASSET_TYPES[name],
                        headers={"Cache-Control": "public, max-age=86400", "X-Content-Type-Options": "nosniff"})
