"""Open Inference Protocol v2 (KServe / Triton REST): request tensors in, response tensors out.

No HTTP here: ``routes/v2.py`` reads the body under the byte limit, this module turns it into images
and turns the worker's results into output tensors. Everything a request may carry is checked here
against the same limits as the native routes (``upload.UploadLimits``, ``max_image_pixels``).

Body: JSON, or with the binary tensor data extension a JSON header of ``Inference-Header-Content-Length``
bytes followed by the raw data of each input whose ``parameters`` carry ``binary_data_size``, in
input order (BYTES elements as a 4-byte little-endian length, then the bytes).

Inputs (any of them, in the order wanted back):
  images  BYTES [N]            encoded images (binary: the file's bytes; JSON: base64 or data URLs)
  pixels  UINT8 [N, H, W, 3]   raw RGB pixels, row-major
Outputs (every one unless ``outputs`` names some):
  probabilities FP32 [N, classes]   with the classification parameter k: BYTES [N, k] "score:index:label"
  labels        BYTES [N, top_k]    class names, most probable first
  lifespans     FP32 [N, rows, cols] patch lives in layer units
  budget        INT32 [N, stages]   the image's own patch counts per pruning stage
Request ``parameters``: ``top_k``, ``keep_rate``, ``min_keep_rate`` (as in the native API),
``binary_data_output``. Answer ``parameters`` (REST and gRPC): ``keep_rate`` (the lowest rate any of
the request's images ran at), ``scaled`` (whether accuracy scaling lowered any), ``requested_keep_rate``.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..api_errors import UnsupportedMediaType
from ..protocol import ImageResult
from .errors import ApiError, BadImage, InvalidRequest, TooLarge, TooManyImages, TooManyPixels, invalid_json
from .numbers import parse_int
from .upload import RawImage, UploadLimits, _from_base64

HEADER_LENGTH = "Inference-Header-Content-Length"
VERSION = "1"
IMAGES, PIXELS = "images", "pixels"
OUTPUTS = ("probabilities", "labels", "lifespans", "budget")
PLATFORM = "pytorch_patchlife"
EXTENSIONS = ["binary_tensor_data", "classification", "model_configuration", "statistics"]
_LENGTH = struct.Struct("<I")


class ModelNotFound(ApiError):
    status, code = 404, "model_not_found"


# -- request ------------------------------------------------------------------------------------
class InputTensor(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    shape: list[int] = Field(max_length=8)
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None


class RequestedOutput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    parameters: dict[str, Any] | None = None


class InferRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # KServe's client adds model_name; the URL names the model

    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[InputTensor] = Field(min_length=1, max_length=8)
    outputs: list[RequestedOutput] | None = None


@dataclass
class Images:
    """What a request asks for: images in input order (encoded bytes or ``[H, W, 3]`` uint8 pixels)."""

    request: InferRequest
    items: list[RawImage | np.ndarray] = field(default_factory=list)


BODY_TYPES = ("application/json", "application/octet-stream")  # JSON, or JSON + binary tensor data


def check_body_type(content_type: str | None) -> None:
    """415 unless the body is declared JSON or octet-stream (the binary extension), or not declared
    (tritonclient sends none): ``text/plain``, a form, ... are not an inference request."""
    if content_type is None:
        return
    media = content_type.partition(";")[0].strip().lower()
    if media not in BODY_TYPES:
        raise UnsupportedMediaType(f"Content-Type {media or content_type!r} is not an inference request: send "
                                   f"{' or '.join(BODY_TYPES)}")


def split_body(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """The JSON header and the binary part after it (empty without the header-length header)."""
    if header_length is None:
        return body, b""
    n = parse_int(header_length, HEADER_LENGTH, 0, len(body), status=400)  # a framing error: 400
    return body[:n], body[n:]


def parse_request(body: bytes, header_length: str | None, limits: UploadLimits, max_pixels: int) -> Images:
    """Body -> the request and its images; ApiErrors (400/413/422) on anything wrong."""
    head, binary = split_body(body, header_length)
    try:
        request = InferRequest.model_validate_json(head)
    except ValidationError as exc:
        raise invalid_json(exc, "inference request") from None
    return images_from_tensors(request, _binary_chunks(request.inputs, binary), limits, max_pixels)


def images_from_tensors(request: InferRequest, chunks: list[bytes | None], limits: UploadLimits,
                        max_pixels: int) -> Images:
    """The request's images, each input read from its raw ``chunk`` (binary data, the gRPC
    ``raw_input_contents``) or, where that is None, from its JSON ``data``. REST and gRPC share it."""
    _check_counts(request.inputs, limits)
    out = Images(request)
    for tensor, chunk in zip(request.inputs, chunks, strict=True):
        if tensor.name == IMAGES:
            out.items.extend(_encoded_images(tensor, chunk, limits))
        else:
            out.items.extend(_pixel_images(tensor, chunk, limits, max_pixels))
    return out


def _binary_chunks(inputs: list[InputTensor], binary: bytes) -> list[bytes | None]:
    chunks: list[bytes | None] = []
    offset = 0
    for tensor in inputs:
        size = (tensor.parameters or {}).get("binary_data_size")
        if size is None:
            if tensor.data is None:
                raise InvalidRequest(f"input {tensor.name!r} has neither data nor binary_data_size")
            chunks.append(None)
            continue
        if not isinstance(size, int) or isinstance(size, bool) or size < 0 or offset + size > len(binary):
            raise InvalidRequest(f"input {tensor.name!r}: binary_data_size {size!r} does not fit the "
                                 f"{len(binary)} bytes after the JSON header", status=400)
        if tensor.data is not None:
            raise InvalidRequest(f"input {tensor.name!r} has both data and binary_data_size")
        chunks.append(binary[offset:offset + size])
        offset += size
    if offset != len(binary):
        raise InvalidRequest(f"{len(binary) - offset} bytes after the JSON header belong to no input", status=400)
    return chunks


def _check_counts(inputs: list[InputTensor], limits: UploadLimits) -> None:
    """Names, datatypes and shapes, and the image count over all inputs, before any data is read."""
    seen: set[str] = set()
    total = 0
    for t in inputs:
        if t.name in seen:
            raise InvalidRequest(f"input {t.name!r} given twice")
        seen.add(t.name)
        want = {IMAGES: "BYTES", PIXELS: "UINT8"}.get(t.name)
        if want is None:
            raise InvalidRequest(f"unknown input {t.name!r}: expected {IMAGES!r} (BYTES [N], encoded images) "
                                 f"or {PIXELS!r} (UINT8 [N, H, W, 3])")
        if t.datatype != want:
            raise InvalidRequest(f"input {t.name!r} must have datatype {want}, got {t.datatype!r}")
        if any(d < 0 for d in t.shape):
            raise InvalidRequest(f"input {t.name!r}: negative dimension in shape {t.shape}")
        ok = (len(t.shape) == 1 or (len(t.shape) == 2 and t.shape[1] == 1)) if t.name == IMAGES else \
            (len(t.shape) == 4 and t.shape[3] == 3)
        if not ok:
            form = "[N] (or [N, 1])" if t.name == IMAGES else "[N, H, W, 3]"
            raise InvalidRequest(f"input {t.name!r} must have shape {form}, got {t.shape}")
        total += t.shape[0]
    if total > limits.max_images:
        raise TooManyImages(f"{total} images in one request, the limit is {limits.max_images} "
                            "(PATCHLIFE_MAX_IMAGES_PER_REQUEST)")
    if total == 0:
        raise InvalidRequest("no image: the inputs hold 0 images")


def _encoded_images(t: InputTensor, chunk: bytes | None, limits: UploadLimits) -> list[RawImage]:
    n = t.shape[0]
    if chunk is None:  # JSON: strings, base64 (binary image bytes are not valid JSON strings)
        values = list(_json_values(t, IMAGES))
        if len(values) != n or not all(type(v) is str for v in values):
            raise InvalidRequest(f"input {IMAGES!r}: data must hold {n} base64 strings")
        return [_from_base64(v, f"{IMAGES}[{i}]", limits.max_file_bytes) for i, v in enumerate(values)]
    out: list[RawImage] = []
    offset = 0
    for i in range(n):
        if offset + 4 > len(chunk):
            raise InvalidRequest(f"input {IMAGES!r}: binary data ends before element {i} of {n}", status=400)
        (size,) = _LENGTH.unpack_from(chunk, offset)
        if size > limits.max_file_bytes:
            raise TooLarge(f"{IMAGES}[{i}] is over the limit of {limits.max_file_bytes} bytes "
                           "(PATCHLIFE_MAX_UPLOAD_BYTES)")
        if offset + 4 + size > len(chunk):
            raise InvalidRequest(f"input {IMAGES!r}: element {i} is cut short", status=400)
        out.append(RawImage(chunk[offset + 4:offset + 4 + size], None, f"{IMAGES}[{i}]"))
        offset += 4 + size
    if offset != len(chunk):
        raise InvalidRequest(f"input {IMAGES!r}: {len(chunk) - offset} bytes after its {n} elements", status=400)
    return out


def _pixel_images(t: InputTensor, chunk: bytes | None, limits: UploadLimits, max_pixels: int) -> list[np.ndarray]:
    n, h, w, _ = t.shape
    if h * w > max_pixels:
        raise TooManyPixels(f"{PIXELS}: {w}x{h} = {w * h} pixels, over the limit of {max_pixels} "
                            "(PATCHLIFE_MAX_IMAGE_PIXELS)")
    if h * w * 3 > limits.max_file_bytes:
        raise TooLarge(f"{PIXELS}: one {h}x{w}x3 image is {h * w * 3} bytes, over the limit of "
                       f"{limits.max_file_bytes} bytes (PATCHLIFE_MAX_UPLOAD_BYTES)")
    if n and (h == 0 or w == 0):
        raise BadImage(f"{PIXELS}: images have no pixels ({w}x{h})")
    want = n * h * w * 3
    if chunk is not None:
        if len(chunk) != want:
            raise InvalidRequest(f"input {PIXELS!r}: {len(chunk)} bytes of binary data for shape {t.shape} "
                                 f"({want} bytes)", status=400)
        arr = np.frombuffer(chunk, np.uint8)
    else:
        arr = _uint8_from_json(t, want)
    return list(arr.reshape(n, h, w, 3))


def _json_values(t: InputTensor, name: str) -> np.ndarray:
    """A tensor's JSON ``data`` as a flat object array, strict as Triton reads it: flat (row-major),
    or nested exactly as its shape; deeper or other nesting is 422."""
    try:
        arr = np.asarray(t.data if t.data is not None else [], dtype=object)
    except ValueError:  # nesting numpy cannot hold (over its dimension limit)
        raise InvalidRequest(f"input {name!r}: data is nested deeper than its shape {t.shape}") from None
    if arr.ndim > 1 and arr.shape != tuple(t.shape):
        raise InvalidRequest(f"input {name!r}: data nested as {list(arr.shape)}, not as its shape {t.shape}: "
                             "send it flat (row-major) or nested as the shape")
    return arr.ravel()


def _uint8_from_json(t: InputTensor, want: int) -> np.ndarray:
    """UINT8 data: every element a JSON integer from 0 to 255 (``true`` or ``1.0`` is not a UINT8)."""
    values = _json_values(t, PIXELS)
    kinds = set(map(type, values))  # bool is not int here: type(True) is bool
    if kinds - {int}:
        found = ", ".join(sorted(k.__name__ for k in kinds - {int}))
        raise InvalidRequest(f"input {PIXELS!r}: values must be integers from 0 to 255 (found {found}; a "
                             "list here is a ragged array)")
    if values.size != want:
        raise InvalidRequest(f"input {PIXELS!r}: {values.size} values for a shape holding {want}")
    try:
        ints = values.astype(np.int64)  # every element is an int now: no bool or float is converted
    except OverflowError:
        ints = np.array([-1])
    if ints.size and (int(ints.min()) < 0 or int(ints.max()) > 255):
        raise InvalidRequest(f"input {PIXELS!r}: values must be integers from 0 to 255")
    return ints.astype(np.uint8)


# -- response -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class OutputSpec:
    name: str
    binary: bool
    classification: int | None  # Triton's classification extension (probabilities only)


def requested_outputs(request: InferRequest, max_top_k: int) -> list[OutputSpec]:
    default_binary = _flag((request.parameters or {}).get("binary_data_output", False), "binary_data_output")
    asked = request.outputs if request.outputs is not None else [RequestedOutput(name=n) for n in OUTPUTS]
    specs: list[OutputSpec] = []
    seen: set[str] = set()
    for out in asked:  # 400 as Triton answers an output it cannot give; each at most once bounds the answer
        if out.name not in OUTPUTS:
            raise InvalidRequest(f"unknown output {out.name!r}: expected one of {', '.join(OUTPUTS)}", status=400)
        if out.name in seen:
            raise InvalidRequest(f"output {out.name!r} requested twice: name each output at most once", status=400)
        seen.add(out.name)
        params = out.parameters or {}
        binary = _flag(params.get("binary_data", default_binary), "binary_data")
        k = params.get("classification")
        if k is not None and (out.name != "probabilities" or not isinstance(k, int) or isinstance(k, bool)
                              or not 1 <= k <= max_top_k):
            raise InvalidRequest(f"classification must be an integer from 1 to {max_top_k}, on output "
                                 f"'probabilities' only (got {k!r} on {out.name!r})")
        specs.append(OutputSpec(out.name, binary, k))
    return specs


def _flag(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidRequest(f"parameter {name} must be true or false, got {value!r}")
    return value


def _top(results: list[ImageResult], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k probabilities and class indices, ``[N, k]`` each."""
    probs = torch.stack([r.probs for r in results])
    values, indices = torch.topk(probs, k=min(k, probs.shape[1]), dim=1)
    return values.numpy(), indices.numpy()


def _name(names: list[str], i: int) -> str:
    return names[i] if i < len(names) else str(i)


def output_tensor(spec: OutputSpec, results: list[ImageResult], class_names: list[str],
                  top_k: int) -> tuple[str, np.ndarray]:
    """(datatype, array) of one output; BYTES arrays hold ``bytes`` objects."""
    if spec.name == "probabilities" and spec.classification is None:
        return "FP32", torch.stack([r.probs for r in results]).numpy().astype(np.float32)
    if spec.name in ("probabilities", "labels"):
        values, indices = _top(results, spec.classification or top_k)
        if spec.name == "labels":
            text = [[_name(class_names, i).encode() for i in row] for row in indices.tolist()]
        else:
            text = [[f"{p:.6f}:{i}:{_name(class_names, i)}".encode() for p, i in zip(pr, ir, strict=True)]
                    for pr, ir in zip(values.tolist(), indices.tolist(), strict=True)]
        return "BYTES", _bytes_array(text)
    if spec.name == "lifespans":
        return "FP32", torch.stack([r.lives for r in results]).numpy().astype(np.float32)
    return "INT32", np.array([list(r.budget) for r in results], dtype=np.int32)


def _bytes_array(rows: list[list[bytes]]) -> np.ndarray:
    arr = np.empty((len(rows), len(rows[0]) if rows else 0), dtype=object)
    for i, row in enumerate(rows):
        arr[i, :] = row
    return arr


def _serialize(datatype: str, arr: np.ndarray) -> bytes:
    if datatype == "BYTES":
        return b"".join(_LENGTH.pack(len(v)) + v for v in arr.ravel())
    return arr.astype(arr.dtype.newbyteorder("<")).tobytes()


def _json_data(datatype: str, arr: np.ndarray) -> list[Any]:
    if datatype == "BYTES":
        return [v.decode("utf-8", "replace") for v in arr.ravel()]
    return arr.ravel().tolist()  # type: ignore[no-any-return]


def answer_parameters(results: list[ImageResult]) -> dict[str, Any]:
    """What accuracy scaling did to the request (the answer's ``parameters``): its images' lowest served
    keep rate, whether any was scaled, the rate asked for."""
    requested = [r.keep_rate if r.requested_keep_rate is None else r.requested_keep_rate for r in results]
    return {"keep_rate": min(r.keep_rate for r in results) if results else 0.0,
            "scaled": any(r.scaled for r in results),
            "requested_keep_rate": max(requested) if requested else 0.0}


def encode_response(model: str, request: InferRequest, specs: list[OutputSpec], results: list[ImageResult],
                    class_names: list[str], top_k: int) -> tuple[bytes, int | None]:
    """The response body and, when some output is binary, the JSON header's length."""
    outputs, blobs = [], []
    for spec in specs:
        datatype, arr = output_tensor(spec, results, class_names, top_k)
        entry: dict[str, Any] = {"name": spec.name, "datatype": datatype, "shape": list(arr.shape)}
        if spec.binary:
            blob = _serialize(datatype, arr)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = _json_data(datatype, arr)
        outputs.append(entry)
    response: dict[str, Any] = {"model_name": model, "model_version": VERSION,
                                "parameters": answer_parameters(results), "outputs": outputs}
    if request.id is not None:
        response["id"] = request.id
    head = json.dumps(response, separators=(",", ":")).encode()
    return (head + b"".join(blobs), len(head)) if blobs else (head, None)


# -- metadata -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorSpec:
    """One input or output of the served model; ``dims`` without the batch dimension (-1: any size)."""

    name: str
    datatype: str
    dims: tuple[int, ...]


def tensor_specs(info: dict[str, Any]) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Inputs and outputs, from ``Engine.info()``: the one table behind the model metadata and the
    Triton model configuration (``service/frontend/triton.py``)."""
    rows, cols = info["grid"]
    stages = len(info["schedule"]["patch_counts"])
    inputs = [TensorSpec(IMAGES, "BYTES", (1,)), TensorSpec(PIXELS, "UINT8", (-1, -1, 3))]
    outputs = [TensorSpec("probabilities", "FP32", (info["num_classes"],)), TensorSpec("labels", "BYTES", (-1,)),
               TensorSpec("lifespans", "FP32", (rows, cols)), TensorSpec("budget", "INT32", (stages,))]
    return inputs, outputs


def model_metadata(info: dict[str, Any]) -> dict[str, Any]:
    """``GET /v2/models/{name}``, from ``Engine.info()``: each tensor's shape is the batch dimension
    (-1) followed by its dims."""
    inputs, outputs = tensor_specs(info)

    def entry(t: TensorSpec) -> dict[str, Any]:
        return {"name": t.name, "datatype": t.datatype, "shape": [-1, *t.dims]}

    return {"name": info["name"], "versions": [VERSION], "platform": PLATFORM,
            "inputs": [entry(t) for t in inputs], "outputs": [entry(t) for t in outputs]}


def raw_tensor(datatype: str, arr: np.ndarray) -> bytes:
    """An output's raw bytes, as the binary tensor data extension and gRPC's ``raw_output_contents``
    carry them (BYTES elements length-prefixed, numbers little-endian)."""
    return _serialize(datatype, arr)
