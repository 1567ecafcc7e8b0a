"""The web page (GET / and its static files) and the model's example images (GET /v1/examples).

The page is plain HTML/CSS/JS in ``service/frontend/static/`` (no build step, nothing fetched from outside)
and talks only to the public JSON API. Examples live beside the checkpoint:
``<checkpoint>/examples/examples.json``, a list of ``{"file", "label", "note"}``, with the images
next to it. Only files listed there are served, by exact name, so no path can reach anything else.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from fastapi import APIRouter
from fastapi.responses import FileResponse
from starlette.exceptions import HTTPException

from ..schemas import ErrorResponse, Example, ExampleList
from ..state import FrontendState
from .params import FrontendDep

log = logging.getLogger("patchlife.ui")
router = APIRouter()

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
_STATIC_TYPES = {".html": "text/html; charset=utf-8", ".css": "text/css; charset=utf-8",
                 ".js": "text/javascript; charset=utf-8", ".svg": "image/svg+xml"}
_IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp",
                ".gif": "image/gif"}
# The page loads only its own files and talks only to this server.
PAGE_HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff",
                "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; "
                                           "object-src 'none'; base-uri 'none'; frame-ancestors 'none'"}


def _static_files() -> dict[str, Path]:
    """Name -> path of every servable file in ``service/frontend/static`` (listed once: the set is fixed)."""
    if not STATIC_DIR.is_dir():
        return {}
    return {p.name: p for p in sorted(STATIC_DIR.iterdir()) if p.is_file() and p.suffix in _STATIC_TYPES}


STATIC_FILES = _static_files()  # only these names are served: no path from a URL reaches the disk


def _static(name: str) -> FileResponse:
    path = STATIC_FILES.get(name)
    if path is None:
        raise HTTPException(404, f"no static file named {name!r}")
    return FileResponse(path, media_type=_STATIC_TYPES[path.suffix], headers=PAGE_HEADERS)


@router.get("/", include_in_schema=False)
def page() -> FileResponse:
    """The web page: upload an image, see the labels, the token budget and each patch's lifespan."""
    return _static("index.html")


@router.get("/static/{name}", include_in_schema=False)
def static_file(name: str) -> FileResponse:
    return _static(name)


# -- examples ------------------------------------------------------------------------------------
def _valid_entry(entry: Any, folder: Path) -> bool:
    if not isinstance(entry, dict) or not isinstance(entry.get("file"), str):
        return False
    name = entry["file"]
    plain = name == Path(name).name and not name.startswith(".") and "\\" not in name
    return plain and Path(name).suffix.lower() in _IMAGE_TYPES and (folder / name).is_file()


def read_examples(checkpoint: Path) -> list[dict[str, Any]]:
    """The entries of ``<checkpoint>/examples/examples.json`` whose image exists; [] without the file.

    A malformed file or entry is logged and left out: the page then shows fewer (or no) examples.
    """
    folder = checkpoint / "examples"
    listing = folder / "examples.json"
    if not listing.is_file():
        return []
    try:
        entries = json.loads(listing.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        log.warning("ignoring %s: %s", listing, exc)
        return []
    if not isinstance(entries, list):
        log.warning("ignoring %s: expected a JSON list of {file, label, note}", listing)
        return []
    good = [e for e in entries if _valid_entry(e, folder)]
    if len(good) < len(entries):
        log.warning("%s: %d of %d entries left out (not a plain image file name, or the file is missing)",
                    listing, len(entries) - len(good), len(entries))
    return good


def _checkpoint(fe: FrontendState) -> Path:
    return Path(fe.loaded().checkpoint)


@router.get("/v1/examples", response_model=ExampleList, tags=["models"],
            responses={503: {"model": ErrorResponse}}, summary="Example images shipped with the model")
def examples(fe: FrontendDep) -> ExampleList:
    """The model's example images (an empty list when it ships none), each with the URL to fetch it."""
    return ExampleList(examples=[
        Example(file=e["file"], label=str(e.get("label", "")), note=str(e.get("note", "")),
                url=f"/v1/examples/{e['file']}") for e in read_examples(_checkpoint(fe))])


@router.get("/v1/examples/{file}", response_class=FileResponse, tags=["models"], summary="One example image",
            responses={200: {"content": {t: {} for t in sorted(set(_IMAGE_TYPES.values()))}},
                       404: {"model": ErrorResponse}, 503: {"model": ErrorResponse}})
def example_file(file: str, fe: FrontendDep) -> FileResponse:
    """The image of an example listed by ``GET /v1/examples``; any other name is a 404."""
    checkpoint = _checkpoint(fe)
    if file not in {e["file"] for e in read_examples(checkpoint)}:
        raise HTTPException(404, f"no example named {file!r}")
    path = checkpoint / "examples" / file
    return FileResponse(path, media_type=_IMAGE_TYPES[path.suffix.lower()],
                        headers={"Cache-Control": "public, max-age=300", "X-Content-Type-Options": "nosniff"})
