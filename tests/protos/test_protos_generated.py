"""The committed generated code matches the .proto, whichever grpcio-tools is installed (regenerate with
``make protos``): the contract is compared (descriptor, services, stubs), not the generator's bytes."""
from __future__ import annotations

import re
from pathlib import Path

import grpc
from google.protobuf import descriptor_pb2
from google.protobuf.message_factory import GetMessageClass

from protos import engram_memory_v1_pb2 as pb
from protos import engram_memory_v1_pb2_grpc as pb_grpc
from protos.generate import PROTO_FILES, REPO_ROOT, pinned_version, run_protoc

STALE = "the committed protos/*_pb2* are stale: run `make protos`"


def _json_name(name: str) -> str:
    """protoc's default json_name: lowerCamelCase of the field name."""
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def _normalized(fdp: descriptor_pb2.FileDescriptorProto) -> descriptor_pb2.FileDescriptorProto:
    """Drop what protoc records for some outputs only: source info and json_names that merely repeat the default."""
    fdp.ClearField("source_code_info")
    messages, fields = list(fdp.message_type), list(fdp.extension)
    while messages:
        message = messages.pop()
        messages += message.nested_type
        fields += list(message.field) + list(message.extension)
    for field in fields:
        if field.json_name == _json_name(field.name):
            field.ClearField("json_name")
    return fdp


def test_descriptor_matches_proto(tmp_path: Path):
    (proto,) = PROTO_FILES
    out = tmp_path / "set.pb"
    run_protoc(f"--descriptor_set_out={out}", str(REPO_ROOT / proto))
    (fresh,) = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file
    committed = descriptor_pb2.FileDescriptorProto.FromString(pb.DESCRIPTOR.serialized_pb)
    assert fresh.name == committed.name == proto
    committed, fresh = _normalized(committed), _normalized(fresh)
    named = [{f"{kind} {d.name}": d for kind in ("message_type", "enum_type", "service") for d in getattr(fdp, kind)}
             for fdp in (committed, fresh)]
    differing = sorted(key for key in named[0].keys() | named[1].keys() if named[0].get(key) != named[1].get(key))
    assert committed == fresh, f"{STALE}; differing: {', '.join(differing) or 'file-level options'}"


class _Channel:
    """Records the multi-callables a stub asks for: path -> (kind, request serializer, response deserializer)."""

    def __init__(self):
        self.calls = {}

    def __getattr__(self, kind):
        def multi_callable(path, request_serializer=None, response_deserializer=None, **_):
            self.calls[path] = (kind, request_serializer, response_deserializer)
            return path
        return multi_callable


class _Server:
    """Records the method handlers registered on it, by service name."""

    def __init__(self):
        self.generic, self.registered = [], {}

    def add_generic_rpc_handlers(self, handlers):
        self.generic += handlers

    def add_registered_method_handlers(self, service, handlers):
        self.registered[service] = handlers


class _CallDetails(grpc.HandlerCallDetails):
    def __init__(self, method: str):
        self.method, self.invocation_metadata = method, ()


def _public(obj) -> set[str]:
    return {name for name in vars(obj) if not name.startswith("_")}


def test_grpc_code_serves_the_descriptor():
    services = pb.DESCRIPTOR.services_by_name
    assert {name[:-len("Stub")] for name in dir(pb_grpc) if name.endswith("Stub")} == set(services), STALE
    for name, service in services.items():
        methods = service.methods_by_name
        channel, server = _Channel(), _Server()
        stub, servicer = getattr(pb_grpc, f"{name}Stub")(channel), getattr(pb_grpc, f"{name}Servicer")()
        getattr(pb_grpc, f"add_{name}Servicer_to_server")(servicer, server)
        assert _public(stub) == _public(type(servicer)) == _public(getattr(pb_grpc, name)) == set(methods), STALE
        assert len(channel.calls) == len(methods) and set(server.registered[service.full_name]) == set(methods), STALE
        for method in methods.values():
            path = f"/{service.full_name}/{method.name}"
            kind = "_".join("stream" if streaming else "unary"
                            for streaming in (method.client_streaming, method.server_streaming))
            request, response = GetMessageClass(method.input_type), GetMessageClass(method.output_type)
            assert getattr(stub, method.name) == path, STALE
            assert channel.calls[path] == (kind, request.SerializeToString, response.FromString), STALE
            handler = server.registered[service.full_name][method.name]
            assert {h.service(_CallDetails(path)) for h in server.generic} - {None} == {handler}, STALE
            assert (handler.request_streaming, handler.response_streaming) == \
                   (method.client_streaming, method.server_streaming), STALE
            assert getattr(handler, kind) == getattr(servicer, method.name), STALE
            assert handler.request_deserializer == request.FromString, STALE
            assert handler.response_serializer == response.SerializeToString, STALE


def test_pyi_lists_every_message_and_field():
    stub = (REPO_ROOT / "protos" / "engram_memory_v1_pb2.pyi").read_text()
    classes = re.findall(r"^class (\w+)\(_message\.Message\):\n\s+__slots__ = \(([^)]*)\)", stub, re.M)
    listed = {name: set(re.findall(r'"(\w+)"', slots)) for name, slots in classes}
    messages = pb.DESCRIPTOR.message_types_by_name
    assert listed == {name: set(message.fields_by_name) for name, message in messages.items()}, STALE


def test_generated_by_pinned_tools():
    assert pb_grpc.GRPC_GENERATED_VERSION == pinned_version(), "run `make protos` (GRPC_TOOLS_PIN in the Makefile)"


def test_package_is_versioned():
    assert pb.DESCRIPTOR.package == "engram.memory.v1"
    assert {"ShardService", "DirectoryService"} <= set(pb.DESCRIPTOR.services_by_name)
