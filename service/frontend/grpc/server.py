"""The Open Inference Protocol v2 over gRPC: KServe's ``inference.GRPCInferenceService``, with Triton's
ModelConfig and ModelStatistics, on ``PATCHLIFE_GRPC_PORT`` beside the HTTP API.

It runs in the app's event loop (``grpc.aio``, started and stopped by the app's lifespan) and is a
second transport, not a second service: model checks, decoding, the worker call, limits, the
deadline and the metrics are the REST route's own (``service/frontend/infer.py``'s ``check_model``
and ``infer_images``, on the front end's state of ``service/frontend/state.py``), and its calls count
in the requests the shutdown drain waits for. Errors carry the REST message with the gRPC code of the
HTTP status (``GRPC_CODES``); ``Retry-After`` travels as trailing metadata. The request deadline is
the call's gRPC deadline, else ``PATCHLIFE_DEADLINE_MS``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import grpc
from google.protobuf.message import Message

from .. import oip, triton
from ..access import GRPC_GROUPS, Group, grpc_authorization
from ..errors import ApiError
from ..infer import check_model, infer_images, served_model
from ..state import FrontendState
from . import convert
from . import grpc_service_pb2 as pb

log = logging.getLogger("patchlife.grpc")
SERVICE = "inference.GRPCInferenceService"  # the protocol's name (the messages' package differs, see the .proto)
GRPC_CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
              415: grpc.StatusCode.INVALID_ARGUMENT, 422: grpc.StatusCode.INVALID_ARGUMENT,
              404: grpc.StatusCode.NOT_FOUND,
              413: grpc.StatusCode.RESOURCE_EXHAUSTED, 499: grpc.StatusCode.CANCELLED,
              503: grpc.StatusCode.UNAVAILABLE, 504: grpc.StatusCode.DEADLINE_EXCEEDED}
Handler = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Message]]


class InferenceServicer:
    """One method per RPC of the .proto's service, each answering from the front-end state the routes use."""

    def __init__(self, fe: FrontendState, version: str) -> None:
        self.fe = fe
        self.version = version

    async def ServerLive(self, request: pb.ServerLiveRequest, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.fe.not_ready_reason() is None)

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Any) -> pb.ModelReadyResponse:
        card = self.fe.card  # an unknown model is not ready (tritonclient's is_model_ready, as over REST)
        known = card is not None and request.name == card.name and request.version in ("", oip.VERSION)
        return pb.ModelReadyResponse(ready=known and self.fe.not_ready_reason() is None)

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Any) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="patchlife", version=self.version, extensions=oip.EXTENSIONS)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Any) -> Message:
        card = served_model(self.fe, request.name, request.version or None)
        return convert.from_dict(oip.model_metadata(card.info), pb.ModelMetadataResponse())

    async def ModelConfig(self, request: pb.ModelConfigRequest, context: Any) -> Message:
        card = served_model(self.fe, request.name, request.version or None)
        config = triton.model_config(card, self.fe.settings)
        return convert.from_dict({"config": config}, pb.ModelConfigResponse())

    async def ModelStatistics(self, request: pb.ModelStatisticsRequest, context: Any) -> Message:
        if request.name:
            name = served_model(self.fe, request.name, request.version or None).name
        elif self.fe.card is not None:  # no name: every model
            name = self.fe.card.name
        else:
            return pb.ModelStatisticsResponse()
        stats = triton.model_statistics(self.fe.metrics, name)
        return convert.from_dict({"model_stats": [stats]}, pb.ModelStatisticsResponse())

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        fe = self.fe
        remaining = context.time_remaining()
        budget_s = fe.settings.deadline_ms / 1000.0 if remaining is None else remaining
        deadline = fe.clock()() + budget_s
        card = check_model(fe, request.model_name, request.model_version or None)
        limits, max_pixels = fe.limits(), fe.settings.max_image_pixels
        parsed = convert.infer_request(request, limits, max_pixels) if convert.converts_inline(request) else \
            await anyio.to_thread.run_sync(convert.infer_request, request, limits, max_pixels)
        done = await infer_images(fe, parsed, deadline, None)
        t0 = time.perf_counter()
        outputs = [(spec.name, *oip.output_tensor(spec, done.results, list(card.class_names), done.top_k))
                   for spec in done.specs]
        response = convert.infer_response(card.name, request.id, outputs, oip.answer_parameters(done.results))
        fe.metrics.encode_seconds.observe(time.perf_counter() - t0)
        return response


def _failure(fe: FrontendState, exc: Exception) -> tuple[grpc.StatusCode, str, tuple[tuple[str, str], ...]]:
    """An exception of a call -> (code, message, trailing metadata), counted like the REST error."""
    if isinstance(exc, ApiError):
        if exc.reason:
            fe.metrics.reject(exc.reason)
        retry = exc.headers.get("Retry-After")
        return GRPC_CODES.get(exc.status, grpc.StatusCode.INTERNAL), exc.message, \
            (("retry-after", retry),) if retry else ()
    log.exception("gRPC call failed")
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}); see the server log", ()


def _wrap(fe: FrontendState, method: str, handler: Handler, group: Group | None) -> Handler:
    """Checks the key of the method's access ``group`` (None: open), counts the call in flight (the
    drain waits for it) and in the latency metric; errors -> status."""

    async def call(request: Any, context: grpc.aio.ServicerContext) -> Message:
        code = grpc.StatusCode.CANCELLED  # what is recorded if the call is cancelled (client gone, deadline)
        fe.in_flight.count += 1
        t0 = time.perf_counter()
        try:
            if group is not None:
                fe.keys.check(group, grpc_authorization(context.invocation_metadata()))
            response = await handler(request, context)
            code = grpc.StatusCode.OK
            return response
        except Exception as exc:  # noqa: BLE001 - every error becomes a status, as over REST
            code, message, trailer = _failure(fe, exc)
        finally:
            # counted before the status leaves: a client that has its answer finds the call in /metrics
            fe.in_flight.count -= 1
            fe.metrics.grpc_duration.labels(method, code.name).observe(time.perf_counter() - t0)
        await context.abort(code, message, trailer)
        raise AssertionError("unreachable: abort raises")

    return call


def generic_handler(fe: FrontendState, version: str) -> grpc.GenericRpcHandler:
    """Every RPC the .proto declares, served under the protocol's service name, each in its access
    group (``access.GRPC_GROUPS``: a method missing there is a KeyError at start, never an open door)."""
    servicer = InferenceServicer(fe, version)
    methods = {}
    for m in pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods:
        request_cls, response_cls = getattr(pb, m.input_type.name), getattr(pb, m.output_type.name)
        methods[m.name] = grpc.unary_unary_rpc_method_handler(
            _wrap(fe, m.name, getattr(servicer, m.name), GRPC_GROUPS[m.name]),
            request_deserializer=request_cls.FromString, response_serializer=response_cls.SerializeToString)
        # each method's OK series exists (at zero) from the start: a scrape before the first call finds
        # the latency family, and rate() over it starts from 0 rather than from the first call
        fe.metrics.grpc_duration.labels(m.name, grpc.StatusCode.OK.name)
    return grpc.method_handlers_generic_handler(SERVICE, methods)


async def start_server(fe: FrontendState, version: str) -> grpc.aio.Server:
    """Bind ``PATCHLIFE_HOST:PATCHLIFE_GRPC_PORT`` and start serving (RuntimeError if the port is taken).

    Messages are capped at ``PATCHLIFE_MAX_REQUEST_BYTES`` (gRPC answers RESOURCE_EXHAUSTED past it);
    ``so_reuseport`` is off so that a second server on the same port fails instead of sharing it, except
    in the API processes of one ``serve``, which share it (the model process checked it was free)."""
    s = fe.settings
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", s.max_request_bytes),
                                      ("grpc.max_send_message_length", -1),
                                      ("grpc.so_reuseport", int(fe.shared_ports))])
    server.add_generic_rpc_handlers((generic_handler(fe, version),))
    host = f"[{s.host}]" if ":" in s.host else s.host
    try:
        port = server.add_insecure_port(f"{host}:{s.grpc_port}")
    except RuntimeError as exc:
        raise RuntimeError(f"cannot listen for gRPC on {host}:{s.grpc_port} (PATCHLIFE_GRPC_PORT): {exc}") from None
    if port == 0:
        raise RuntimeError(f"cannot listen for gRPC on {host}:{s.grpc_port} (PATCHLIFE_GRPC_PORT)")
    await server.start()
    log.info("gRPC (Open Inference Protocol v2) on %s:%d", host, port)
    return server
