"""POST /explain: the lifespan heatmap of one image, as a PNG or as JSON with the PNG in base64."""

from __future__ import annotations

import base64
from typing import Annotated, Literal

import anyio
import torch
from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from PIL import Image

from ...protocol import ModelCard
from ..access import Group, require
from ..explain import render_heatmap
from ..pipeline import classification, prepare_images, resolve_options, run_model, scaling_headers
from ..schemas import IMAGE_ERRORS, IMAGES_REQUEST_BODY, ExplainResponse
from ..upload import read_payload
from .params import DeadlineDep, FrontendDep, KeepRateQuery, MinKeepRateQuery, TopKQuery

router = APIRouter(tags=["inference"], dependencies=[require(Group.INFERENCE)])
FormatQuery = Annotated[Literal["png", "json"] | None, Query(
    description="png (default) or json; without it, `Accept: application/json` selects json.")]


def heatmap_png(view: Image.Image, lives: torch.Tensor, card: ModelCard) -> bytes:
    """The heatmap over ``view``, the region the preprocessing kept (the lives' coordinates; made by
    ``prepare_images(keep_view=True)`` right after decoding, so the full-size image is not kept)."""
    return render_heatmap(view, lives, card.first_block, card.depth)


def wants_json(fmt: str | None, accept: str) -> bool:
    if fmt is not None:
        return fmt == "json"
    accept = accept.lower()
    return "application/json" in accept and "image/png" not in accept


@router.post("/explain", responses={**IMAGE_ERRORS, 200: {
    "content": {"image/png": {}, "application/json": {"schema": {"$ref": "#/components/schemas/ExplainResponse"}}},
    "description": "The heatmap PNG, or JSON (format=json / Accept: application/json)."}},
    response_model=ExplainResponse, openapi_extra=IMAGES_REQUEST_BODY, summary="Lifespan heatmap of one image")
async def explain(request: Request, fe: FrontendDep, deadline: DeadlineDep, top_k: TopKQuery = None,
                  keep_rate: KeepRateQuery = None, format: FormatQuery = None,
                  min_keep_rate: MinKeepRateQuery = None) -> Response | ExplainResponse:
    """Exactly one image (same inputs as /classify); a second image is 413 too_many_images.
    The PNG shows the model's view of the photo, each patch coloured by its life (layers), with a
    colour bar from K (pruned first) to L (kept to the end)."""
    card = fe.serving()
    payload = await read_payload(request, fe.limits(max_images=1))
    options = resolve_options(top_k, keep_rate, payload.options, fe.settings, min_keep_rate, card)
    prepared = await prepare_images(payload.images, fe, keep_view=True, deadline=deadline)
    (result,) = await run_model(request.receive, fe.model, prepared.pixels, options.keep_rate, deadline,
                                options.min_keep_rate)
    png = await anyio.to_thread.run_sync(heatmap_png, prepared.views[0], result.lives, card)
    if not wants_json(format, request.headers.get("accept", "")):
        return Response(png, media_type="image/png", headers=scaling_headers([result]))
    body = classification(result, prepared.decode_ms[0], card, options.top_k)
    return ExplainResponse(model=card.name, png_base64=base64.b64encode(png).decode("ascii"),
                           **body.model_dump())
