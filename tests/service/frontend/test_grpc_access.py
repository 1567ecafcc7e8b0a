"""Access keys over gRPC (service/frontend/access.py's GRPC_GROUPS): UNAUTHENTICATED without the
group's key or with a wrong one, through Triton's own gRPC client and its ``headers``; health stays
open; every RPC of the .proto has a group. The REST side is test_access.py."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import grpc
import numpy as np
import pytest
from fastapi.testclient import TestClient
from service_support import encode, photo

from bench.child import free_port
from service.frontend.access import GRPC_GROUPS, Group
from service.frontend.grpc import grpc_service_pb2 as pb

tg = pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] is not installed: the gRPC access "
                         "checks did NOT run (pip install -e '.[dev]')")
from tritonclient.utils import InferenceServerException  # noqa: E402

MODEL = "nano-test"
KEYS = {Group.INFERENCE: "grpc-inference", Group.METADATA: "grpc-metadata"}  # metrics: no gRPC call


@pytest.fixture(scope="module")
def triton(make_client: Callable[..., TestClient]) -> Iterator[Any]:
    port = free_port()
    make_client(grpc_port=port, **{f"api_key_{g.value}": k for g, k in KEYS.items()})
    client = tg.InferenceServerClient(f"127.0.0.1:{port}")
    yield client
    client.close()


def auth(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}  # gRPC metadata keys are lower-case


def images() -> list[Any]:
    tensor = tg.InferInput("images", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([encode(photo(), "PNG")], dtype=np.object_))
    return [tensor]


CALLS: dict[Group, list[Callable[[Any, dict[str, str] | None], Any]]] = {
    Group.INFERENCE: [lambda t, h: t.infer(MODEL, images(), headers=h)],
    Group.METADATA: [lambda t, h: t.get_server_metadata(headers=h), lambda t, h: t.get_model_metadata(MODEL, headers=h),
                     lambda t, h: t.get_model_config(MODEL, headers=h),
                     lambda t, h: t.get_inference_statistics(MODEL, headers=h),
                     lambda t, h: t.get_inference_statistics(headers=h)],
}


def unauthenticated(call: Callable[[Any, dict[str, str] | None], Any], triton: Any,
                    headers: dict[str, str] | None) -> str:
    with pytest.raises(InferenceServerException) as info:
        call(triton, headers)
    assert info.value.status() == "StatusCode.UNAUTHENTICATED", info.value
    return str(info.value.message())


@pytest.mark.parametrize("group", list(CALLS), ids=[g.value for g in CALLS])
def test_each_group_needs_its_key_over_grpc(triton: Any, group: Group) -> None:
    other = next(k for g, k in KEYS.items() if g != group)
    for call in CALLS[group]:
        assert group.setting in unauthenticated(call, triton, None)                 # missing
        assert "wrong key" in unauthenticated(call, triton, auth("nope"))           # wrong
        assert "wrong key" in unauthenticated(call, triton, auth(other))            # another group's
        assert call(triton, auth(KEYS[group])) is not None                                  # right


def test_health_stays_open_over_grpc(triton: Any) -> None:
    assert triton.is_server_live() and triton.is_server_ready() and triton.is_model_ready(MODEL)


def test_every_rpc_has_a_group() -> None:
    methods = {m.name for m in pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods}
    assert set(GRPC_GROUPS) == methods
    assert {m for m, g in GRPC_GROUPS.items() if g is None} == {"ServerLive", "ServerReady", "ModelReady"}


def test_unauthenticated_is_the_grpc_code_of_401() -> None:
    from service.frontend.grpc.server import GRPC_CODES

    assert GRPC_CODES[401] == grpc.StatusCode.UNAUTHENTICATED
