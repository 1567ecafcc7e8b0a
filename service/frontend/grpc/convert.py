"""gRPC messages <-> what the REST side of the protocol works with (``service/frontend/oip.py``'s request model).

A ``ModelInferRequest`` becomes the same ``oip.InferRequest`` plus one raw chunk per input as the
binary tensor data extension lays it out, so ``oip.images_from_tensors`` checks and reads it exactly
as it reads a REST body: same limits, same messages. Answers go back as ``raw_output_contents``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from google.protobuf import json_format
from google.protobuf.message import Message
from pydantic import ValidationError

from .. import infer, oip
from ..errors import InvalidRequest, invalid_json
from ..upload import UploadLimits
from . import grpc_service_pb2 as pb

_LENGTH_BYTES = 4


def parameters(params: Mapping[str, pb.InferParameter]) -> dict[str, Any] | None:
    """A protobuf parameter map as plain values (what a JSON body would have held)."""
    out = {key: getattr(value, value.WhichOneof("parameter_choice") or "bool_param") for key, value in params.items()}
    return out or None


def _contents_chunk(tensor: pb.ModelInferRequest.InferInputTensor) -> bytes:
    """An input's typed ``contents`` as its raw bytes (BYTES length-prefixed, UINT8 one byte each)."""
    c = tensor.contents
    if tensor.datatype == "BYTES":
        return b"".join(len(v).to_bytes(_LENGTH_BYTES, "little") + v for v in c.bytes_contents)
    values = np.asarray(c.uint_contents, dtype=np.uint32)
    if values.size and int(values.max()) > 255:
        raise InvalidRequest(f"input {tensor.name!r}: values must be integers from 0 to 255")
    return values.astype(np.uint8).tobytes()


def converts_inline(msg: pb.ModelInferRequest) -> bool:
    """Whether :func:`infer_request` runs on the event loop, by ``service/frontend/infer.py``'s rule for
    a REST body: raw contents only (typed ``contents`` are converted value by value), a small message,
    and little besides the raw contents (the parameters and tensor descriptions)."""
    if any(_has_contents(t) for t in msg.inputs):
        return False
    size = msg.ByteSize()
    return infer.parsed_inline(size, size - sum(len(r) for r in msg.raw_input_contents))


def _has_contents(tensor: pb.ModelInferRequest.InferInputTensor) -> bool:
    return tensor.HasField("contents") and bool(tensor.contents.ListFields())


def infer_request(msg: pb.ModelInferRequest, limits: UploadLimits, max_pixels: int) -> oip.Images:
    """The request's images, checked like a REST body; ApiErrors (400/413/422) on anything wrong."""
    raw = list(msg.raw_input_contents)
    if raw and len(raw) != len(msg.inputs):
        raise InvalidRequest(f"raw_input_contents has {len(raw)} entries for {len(msg.inputs)} inputs "
                             "(one per input, or none)", status=400)
    try:
        request = oip.InferRequest(
            id=msg.id or None, parameters=parameters(msg.parameters),
            inputs=[oip.InputTensor(name=t.name, shape=list(t.shape), datatype=t.datatype,
                                    parameters=parameters(t.parameters)) for t in msg.inputs],
            outputs=[oip.RequestedOutput(name=o.name, parameters=parameters(o.parameters))
                     for o in msg.outputs] or None)
    except ValidationError as exc:
        raise invalid_json(exc, "inference request") from None
    chunks: list[bytes | None] = []
    for i, tensor in enumerate(msg.inputs):
        if raw and _has_contents(tensor):
            raise InvalidRequest(f"input {tensor.name!r} has both contents and raw_input_contents")
        if raw:
            chunks.append(raw[i])
        elif _has_contents(tensor) or 0 in tensor.shape:
            chunks.append(_contents_chunk(tensor) if tensor.datatype in ("BYTES", "UINT8") else b"")
        else:
            raise InvalidRequest(f"input {tensor.name!r} has no data (contents or raw_input_contents)")
    return oip.images_from_tensors(request, chunks, limits, max_pixels)


def infer_response(model: str, request_id: str, outputs: list[tuple[str, str, np.ndarray]],
                   params: Mapping[str, bool | float] | None = None) -> pb.ModelInferResponse:
    """``(name, datatype, array)`` per output -> the answer, every output raw; ``params``: the answer's
    parameters (``oip.answer_parameters``: booleans and floats)."""
    response = pb.ModelInferResponse(model_name=model, model_version=oip.VERSION, id=request_id)
    for key, value in (params or {}).items():
        if isinstance(value, bool):
            response.parameters[key].bool_param = value
        else:
            response.parameters[key].double_param = float(value)
    for name, datatype, arr in outputs:
        response.outputs.add(name=name, datatype=datatype, shape=list(arr.shape))
        response.raw_output_contents.append(oip.raw_tensor(datatype, arr))
    return response


def from_dict(data: dict[str, Any], message: Message) -> Message:
    """A JSON answer of the REST side (metadata, configuration, statistics) as its gRPC message."""
    return json_format.ParseDict(data, message)
