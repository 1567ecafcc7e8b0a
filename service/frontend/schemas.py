"""Request and response bodies of the HTTP API (pydantic), with the examples shown in OpenAPI."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

_PIXEL = ("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC")


class ImagesJson(BaseModel):
    """JSON form of /classify and /explain (the multipart form takes the same fields)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "examples": [{"images": [_PIXEL], "top_k": 3, "keep_rate": 0.7}]})

    images: list[str] = Field(min_length=1, description="Images as base64, or data URLs "
                                                        "(data:image/png;base64,...), in the order wanted back.")
    # Any: read by the one strict number parser (service/frontend/numbers.py) with the query and form values.
    top_k: Any = Field(None, description="Labels to return per image (1..PATCHLIFE_MAX_TOP_K).",
                       json_schema_extra={"anyOf": [{"type": "integer", "minimum": 1}, {"type": "null"}]})
    keep_rate: Any = Field(None, description="Keep schedule for this request, 0 < r <= 1; default: the model's.",
                           json_schema_extra={"anyOf": [{"type": "number", "exclusiveMinimum": 0, "maximum": 1},
                                                        {"type": "null"}]})
    min_keep_rate: Any = Field(None, description="Lowest keep rate accuracy scaling may run this request at "
                                                 "under load, 0 < r <= keep_rate; default: the server's floor "
                                                 "(none below an explicit keep_rate).",
                               json_schema_extra={"anyOf": [{"type": "number", "exclusiveMinimum": 0, "maximum": 1},
                                                            {"type": "null"}]})


class Label(BaseModel):
    label: str
    index: int = Field(description="Class index in the model's output.")
    probability: float


class Lifespans(BaseModel):
    """Life of every patch in layer units: it takes part in block ``l`` while ``l < life``."""

    rows: int
    cols: int
    values: list[list[float]] = Field(description="rows x cols lives, patch-grid order (row-major).")


class Budget(BaseModel):
    patch_counts: list[int] = Field(description="The image's own patches kept per pruning stage.")
    counts_run: list[int] = Field(description="Counts its batch actually ran at (its bucket, >= own).")
    gflops: float = Field(description="GFLOPs of this image at counts_run.")
    dense_gflops: float = Field(description="GFLOPs of the unpruned backbone.")
    fraction_of_dense: float
    keep_rate: float = Field(description="The keep rate the image ran at.")
    scaled: bool = Field(False, description="True when accuracy scaling ran it below requested_keep_rate (the "
                                            "service was behind its latency objective).")
    requested_keep_rate: float = Field(description="The keep rate asked for (the request's, or the model's "
                                                   "default); equals keep_rate unless scaled.")


class Timings(BaseModel):
    decode: float = Field(description="Decode + preprocess, ms.")
    queue: float = Field(description="Waiting for phase-A and phase-B batches, ms.")
    compute: float = Field(description="Wall time of the batches this image ran in, ms.")


class Classification(BaseModel):
    labels: list[Label]
    lifespans: Lifespans
    budget: Budget
    timings_ms: Timings


_EXAMPLE_RESULT: dict[str, Any] = {
    "labels": [{"label": "tabby cat", "index": 281, "probability": 0.83},
               {"label": "tiger cat", "index": 282, "probability": 0.11}],
    "lifespans": {"rows": 2, "cols": 2, "values": [[4.0, 12.0], [7.8, 10.3]]},
    "budget": {"patch_counts": [139, 99, 71], "counts_run": [144, 104, 72], "gflops": 3.27,
               "dense_gflops": 4.6, "fraction_of_dense": 0.71, "keep_rate": 0.7,
               "scaled": False, "requested_keep_rate": 0.7},
    "timings_ms": {"decode": 2.1, "queue": 0.4, "compute": 31.5},
}


class ClassifyResponse(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"model": "default",
                                                               "results": [_EXAMPLE_RESULT]}]})

    model: str = Field(description="Name of the model that answered.")
    results: list[Classification] = Field(description="One per image, in input order.")


class ExplainResponse(Classification):
    model_config = ConfigDict(json_schema_extra={"examples": [{"model": "default", **_EXAMPLE_RESULT,
                                                               "png_base64": "iVBORw0KGgo..."}]})

    model: str
    png_base64: str = Field(description="The heatmap PNG (what /explain returns as image/png).")


class ErrorInfo(BaseModel):
    code: str = Field(description="Stable machine-readable code, e.g. bad_image, too_large.")
    message: str = Field(description="What was wrong, in words.")
    details: list[dict[str, str]] | None = Field(None, description="Per-field validation errors.")


class ErrorResponse(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"error": {"code": "bad_image", "message": "files[0]: not a supported image (JPEG, PNG, GIF, "
                                                   "BMP, TIFF or WebP)"}}]})

    error: ErrorInfo


class Status(BaseModel):
    status: str = Field(examples=["ok"])
    detail: dict[str, Any] | None = Field(None, description="/readyz: what warm-up did (CUDA graphs captured, "
                                                              "their time and memory; the cost model).")


class ScheduleInfo(BaseModel):
    keep_rate: float | None
    stage_starts: list[int]
    patch_counts: list[int]
    depth: int


class ModelInfo(BaseModel):
    """What ``Engine.info()`` reports; extra keys pass through."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    name: str
    description: str = Field("", description="What the model recognises (the checkpoint's own words).")
    backbone: str
    device: str
    dtype: str
    normalization: str
    num_classes: int
    classes: list[str]
    grid: list[int]
    input_size: list[int]
    schedule: ScheduleInfo
    dense_gflops: float
    batching: dict[str, Any] | None = Field(None, description="What the scheduler believes: the bucket grid "
                                                              "(counts per stage) and the cost model of a batch.")
    crop_pct: float | None = Field(None, description="The preprocessing's centre-crop fraction (timm's "
                                   "crop_pct): lifespans cover the central input_size/crop_pct region of "
                                   "the photo once its shorter side is resized. None: timm's default 0.875.")


class Example(BaseModel):
    file: str = Field(description="File name, as listed in the model's examples/examples.json.")
    label: str = Field(description="The class the example shows.")
    note: str = Field(description="What the example is meant to show.")
    url: str = Field(description="Where to fetch the image (GET /v1/examples/{file}).")


class ExampleList(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"examples": [
        {"file": "simple.png", "label": "cat", "note": "one object, plain background",
         "url": "/v1/examples/simple.png"}]}]})

    examples: list[Example]


class ModelList(BaseModel):
    models: list[ModelInfo]


def _error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {s: {"model": ErrorResponse} for s in statuses}


IMAGE_ERRORS = _error_responses(400, 413, 415, 422, 503, 504)

_FORM_SCHEMA = {
    "type": "object",
    "properties": {
        "file": {"type": "string", "format": "binary", "description": "One image."},
        "files": {"type": "array", "items": {"type": "string", "format": "binary"},
                  "description": "Several images (repeat the field)."},
        "top_k": {"type": "integer", "minimum": 1},  # the server's maximum: service/frontend/openapi.py
        "keep_rate": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
    },
}
# The body is parsed by service/frontend/upload.py (streamed, with limits), so OpenAPI is told its shape here.
IMAGES_REQUEST_BODY: dict[str, Any] = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": _FORM_SCHEMA},
    "application/json": {"schema": ImagesJson.model_json_schema()},
    "image/*": {"schema": {"type": "string", "format": "binary"}},
}}}
