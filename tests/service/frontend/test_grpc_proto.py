"""The gRPC messages: the checked-in module is what ``make grpc-stubs`` makes of the .proto, and every
message and field in it is the published protocol's (same numbers and types as tritonclient's copy)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor

from service.frontend.grpc import grpc_service_pb2 as pb

REPO = Path(__file__).resolve().parents[3]
PROTO = "service/frontend/grpc/grpc_service.proto"


def test_checked_in_messages_match_the_proto(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools", reason="grpcio-tools is not installed (dev extra): the generated module was "
                        "NOT compared with the .proto")
    out = tmp_path / "set.pb"
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I", ".", f"--descriptor_set_out={out}", PROTO],
                   cwd=REPO, check=True)
    fresh = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file[0]
    _drop_json_names(fresh.message_type)  # protoc adds them to a descriptor set, not to the generated module
    checked_in = descriptor_pb2.FileDescriptorProto.FromString(pb.DESCRIPTOR.serialized_pb)
    assert checked_in == fresh, f"run `make grpc-stubs`: {PROTO} changed since the module was generated"


def _drop_json_names(messages: Iterable[descriptor_pb2.DescriptorProto]) -> None:
    for m in messages:
        for f in m.field:
            f.ClearField("json_name")
        _drop_json_names(m.nested_type)


def _type_name(field: FieldDescriptor) -> str:
    ref = field.message_type or field.enum_type
    return ref.full_name.removeprefix(ref.file.package + ".") if ref is not None else str(field.type)


def _messages(d: Descriptor) -> list[Descriptor]:
    return [d, *(m for nested in d.nested_types for m in _messages(nested))]


def test_every_field_is_the_published_protocols() -> None:
    published = pytest.importorskip("tritonclient.grpc.service_pb2", reason="tritonclient[grpc] is not installed: "
                                    "the messages were NOT compared with the published protocol")
    from google.protobuf import descriptor_pool

    pool = descriptor_pool.Default()
    assert published.DESCRIPTOR.package == "inference"
    ours = [m for top in pb.DESCRIPTOR.message_types_by_name.values() for m in _messages(top)]
    assert len(ours) > 20
    for mine in ours:
        relative = mine.full_name.removeprefix(pb.DESCRIPTOR.package + ".")
        theirs = pool.FindMessageTypeByName(f"inference.{relative}")
        for field in mine.fields:
            other = theirs.fields_by_name.get(field.name)
            assert other is not None, f"{relative}.{field.name} is not in the protocol"
            assert (field.number, field.type, field.is_repeated, _type_name(field)) == \
                (other.number, other.type, other.is_repeated, _type_name(other)), f"{relative}.{field.name}"
    enum: EnumDescriptor = pb.DESCRIPTOR.enum_types_by_name["DataType"]
    theirs_enum = pool.FindEnumTypeByName("inference.DataType")
    assert {v.name: v.number for v in enum.values} == {v.name: v.number for v in theirs_enum.values}
    service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    published_service = published.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    for method in service.methods:
        other = published_service.methods_by_name[method.name]
        assert (method.input_type.name, method.output_type.name) == (other.input_type.name, other.output_type.name)
