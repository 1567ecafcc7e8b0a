"""POST /classify: top-k labels, patch lifespans, token budget and timings for each image."""

from __future__ import annotations

from fastapi import APIRouter, Request

from ..access import Group, require
from ..pipeline import classification, prepare_images, resolve_options, run_model
from ..schemas import IMAGE_ERRORS, IMAGES_REQUEST_BODY, ClassifyResponse
from ..state import FrontendState
from ..upload import read_payload
from .direct import DirectRoute, binds
from .params import DeadlineDep, FrontendDep, KeepRateQuery, MinKeepRateQuery, TopKQuery

router = APIRouter(tags=["inference"], dependencies=[require(Group.INFERENCE)], route_class=DirectRoute)


async def _bind(request: Request, fe: FrontendState, deadline: float) -> ClassifyResponse:
    """classify's parameters by hand (routes/direct.py): FastAPI reads the query the same way."""
    query = request.query_params
    return await classify(request, fe, deadline, query.get("top_k"), query.get("keep_rate"),
                          query.get("min_keep_rate"))


@router.post("/classify", response_model=ClassifyResponse, responses=IMAGE_ERRORS,
             openapi_extra=IMAGES_REQUEST_BODY, summary="Classify one or several images")
@binds(_bind, reads=("top_k", "keep_rate", "min_keep_rate"))
async def classify(request: Request, fe: FrontendDep, deadline: DeadlineDep, top_k: TopKQuery = None,
                   keep_rate: KeepRateQuery = None, min_keep_rate: MinKeepRateQuery = None) -> ClassifyResponse:
    """Send images as multipart (`file`, or `files` repeated), as JSON (`{"images": [base64, ...]}`)
    or as a raw `image/*` body. Results come back in input order."""
    card = fe.serving()
    payload = await read_payload(request, fe.limits())
    options = resolve_options(top_k, keep_rate, payload.options, fe.settings, min_keep_rate, card)
    prepared = await prepare_images(payload.images, fe, deadline=deadline)
    results = await run_model(request.receive, fe.model, prepared.pixels, options.keep_rate, deadline,
                              options.min_keep_rate)
    return ClassifyResponse(model=card.name, results=[
        classification(r, ms, card, options.top_k) for r, ms in zip(results, prepared.decode_ms, strict=True)])
