"""Server reflection that also serves the contract's doc comments.

The stock servicer serializes descriptors from the generated modules, which
carry no comments, so `grpcurl describe` would show bare fields. This one
swaps in the documented descriptor that scripts/generate_protos.py writes
beside the generated code (tasks/v1/*_documented.binpb).
"""

from __future__ import annotations

from collections.abc import Iterable
from importlib import resources
from typing import Any

import grpc
from google.protobuf import descriptor_pb2
from grpc_reflection.v1alpha import _async, reflection, reflection_pb2_grpc


def documented_files() -> dict[str, bytes]:
    """File name -> serialized FileDescriptorProto with source info."""
    files: dict[str, bytes] = {}
    for entry in resources.files("tasks.v1").iterdir():
        if entry.name.endswith("_documented.binpb"):
            fds = descriptor_pb2.FileDescriptorSet.FromString(entry.read_bytes())
            for file in fds.file:
                files[file.name] = file.SerializeToString()
    return files


class DocumentedReflectionServicer(_async.ReflectionServicer):  # type: ignore[misc]
    def __init__(self, service_names: Iterable[str]) -> None:
        super().__init__(service_names)
        self._documented = documented_files()

    def _swap(self, response: Any) -> Any:
        if response.HasField("file_descriptor_response"):
            protos = response.file_descriptor_response.file_descriptor_proto
            for i, raw in enumerate(protos):
                name = descriptor_pb2.FileDescriptorProto.FromString(raw).name
                if name in self._documented:
                    protos[i] = self._documented[name]
        return response

    def _file_by_filename(self, request: Any, filename: str) -> Any:
        return self._swap(super()._file_by_filename(request, filename))

    def _file_containing_symbol(self, request: Any, fully_qualified_name: str) -> Any:
        return self._swap(super()._file_containing_symbol(request, fully_qualified_name))


def enable(server: grpc.aio.Server, service_names: Iterable[str]) -> None:
    names = (*service_names, reflection.SERVICE_NAME)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
        DocumentedReflectionServicer(names), server
    )
