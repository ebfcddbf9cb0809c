"""Server reflection: grpc.reflection.v1 and v1alpha, from one implementation.

The two protocols have the same messages under two package names (current
grpcurl and buf curl try v1 first, older tools speak only v1alpha), so one
servicer answers both, encoding with grpcio-reflection's v1alpha classes. The
v1 file descriptor itself is derived from the v1alpha one by renaming its
package, so that tools can describe the v1 service too.

Every symbol a tool can name resolves: packages' messages, their fields,
oneofs and nested types, enums and their values, services, methods and
extensions. TaskService's own files are served with their doc comments
(tasks/v1/*_documented.binpb, written by scripts/generate_protos.py), so
`grpcurl describe` shows the contract's text. A file is always sent with its
transitive dependencies. The files of the error model that TaskService's
errors carry (google/rpc/status.proto, error_details.proto) are served too,
so tools decode an error's ErrorInfo and BadRequest details instead of
printing their bytes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from importlib import resources
from typing import TYPE_CHECKING, Any, TypeAlias

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from google.rpc import error_details_pb2, status_pb2
from grpc_reflection.v1alpha import reflection_pb2

from taskservice.api._access import Context

V1ALPHA = "grpc.reflection.v1alpha.ServerReflection"
V1 = "grpc.reflection.v1.ServerReflection"
_V1_FILE = "grpc/reflection/v1/reflection.proto"
_NOT_FOUND = grpc.StatusCode.NOT_FOUND.value[0]
_INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT.value[0]

if TYPE_CHECKING:
    # grpc_reflection ships reflection_pb2.pyi but no py.typed marker, so mypy
    # cannot read its messages' types (_Untyped).
    _Untyped: TypeAlias = Any
    Request: TypeAlias = _Untyped
    Response: TypeAlias = _Untyped
else:
    Request = reflection_pb2.ServerReflectionRequest
    Response = reflection_pb2.ServerReflectionResponse
FileProto = descriptor_pb2.FileDescriptorProto
# Files no service names but every error carries (google.rpc.Status details).
ERROR_MODEL_FILES = (status_pb2.DESCRIPTOR, error_details_pb2.DESCRIPTOR)


def documented_files() -> dict[str, FileProto]:
    """TaskService's files with source info (comments), by file name."""
    files: dict[str, FileProto] = {}
    for entry in resources.files("tasks.v1").iterdir():
        if entry.name.endswith("_documented.binpb"):
            for file in descriptor_pb2.FileDescriptorSet.FromString(entry.read_bytes()).file:
                files[file.name] = file
    return files


def _v1_file() -> FileProto:
    """grpc/reflection/v1/reflection.proto: the v1alpha file, renamed."""
    file = FileProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(file)
    old, new = "." + file.package + ".", ".grpc.reflection.v1."
    file.name = _V1_FILE
    file.package = "grpc.reflection.v1"
    file.ClearField("options")
    for message in file.message_type:
        for field in message.field:
            if field.type_name.startswith(old):
                field.type_name = new + field.type_name[len(old) :]
    for service in file.service:
        for method in service.method:
            method.input_type = new + method.input_type[len(old) :]
            method.output_type = new + method.output_type[len(old) :]
    return file


class DescriptorIndex:
    """The files reflection serves, and which file declares each symbol."""

    def __init__(self, roots: Iterable[FileProto]) -> None:
        pool = descriptor_pool.Default()
        self.files: dict[str, FileProto] = {}
        self.serialized: dict[str, bytes] = {}
        self.symbols: dict[str, str] = {}
        self.extensions: dict[tuple[str, int], str] = {}
        self.extension_numbers: dict[str, list[int]] = {}
        documented = documented_files()
        pending = list(roots)
        while pending:
            file = pending.pop()
            if file.name in self.files:
                continue
            file = documented.get(file.name, file)
            self.files[file.name] = file
            self.serialized[file.name] = file.SerializeToString()
            self._index(file)
            for dep in file.dependency:
                if dep not in self.files:
                    found = FileProto()
                    pool.FindFileByName(dep).CopyToProto(found)
                    pending.append(found)

    def _add(self, symbol: str, file: str) -> None:
        self.symbols.setdefault(symbol, file)

    def _index(self, file: FileProto) -> None:
        scope = f"{file.package}." if file.package else ""
        for message in file.message_type:
            self._index_message(scope, message, file.name)
        for enum in file.enum_type:
            self._index_enum(scope, enum, file.name)
        for extension in file.extension:
            self._index_extension(scope, extension, file.name)
        for service in file.service:
            name = scope + service.name
            self._add(name, file.name)
            for method in service.method:
                self._add(f"{name}.{method.name}", file.name)

    def _index_message(
        self, scope: str, message: descriptor_pb2.DescriptorProto, file: str
    ) -> None:
        name = scope + message.name
        self._add(name, file)
        self.extension_numbers.setdefault(name, [])
        for field in message.field:
            self._add(f"{name}.{field.name}", file)
        for oneof in message.oneof_decl:
            self._add(f"{name}.{oneof.name}", file)
        for nested in message.nested_type:
            self._index_message(f"{name}.", nested, file)
        for enum in message.enum_type:
            self._index_enum(f"{name}.", enum, file)
        for extension in message.extension:
            self._index_extension(f"{name}.", extension, file)

    def _index_enum(self, scope: str, enum: descriptor_pb2.EnumDescriptorProto, file: str) -> None:
        name = scope + enum.name
        self._add(name, file)
        for value in enum.value:
            self._add(scope + value.name, file)  # protobuf scopes values beside the enum
            self._add(f"{name}.{value.name}", file)

    def _index_extension(
        self, scope: str, extension: descriptor_pb2.FieldDescriptorProto, file: str
    ) -> None:
        self._add(scope + extension.name, file)
        extendee = extension.extendee.lstrip(".")
        self.extensions[(extendee, extension.number)] = file
        self.extension_numbers.setdefault(extendee, []).append(extension.number)

    def with_dependencies(self, name: str) -> list[bytes]:
        """The file, then every file it depends on, transitively, each once."""
        order: list[str] = []
        pending = [name]
        while pending:
            current = pending.pop(0)
            if current in order:
                continue
            order.append(current)
            pending.extend(self.files[current].dependency)
        return [self.serialized[n] for n in order]


class ReflectionService:
    """ServerReflectionInfo for both protocol versions."""

    def __init__(self, service_names: Iterable[str]) -> None:
        roots: list[FileProto] = []
        pool = descriptor_pool.Default()
        names = list(dict.fromkeys([*service_names, V1ALPHA]))
        for name in names:
            file = FileProto()
            pool.FindServiceByName(name).file.CopyToProto(file)
            roots.append(file)
        roots.append(_v1_file())
        for descriptor in ERROR_MODEL_FILES:
            file = FileProto()
            descriptor.CopyToProto(file)
            roots.append(file)
        self.services = [*names, V1]
        self.index = DescriptorIndex(roots)

    async def ServerReflectionInfo(
        self, requests: AsyncIterator[Request], context: Context
    ) -> AsyncIterator[Response]:
        async for request in requests:
            yield self.answer(request)

    def answer(self, request: Request) -> Response:
        response = Response(valid_host=request.host, original_request=request)
        kind = request.WhichOneof("message_request")
        index = self.index
        file: str | None = None
        if kind == "file_by_filename":
            file = request.file_by_filename if request.file_by_filename in index.files else None
        elif kind == "file_containing_symbol":
            file = index.symbols.get(request.file_containing_symbol.lstrip("."))
        elif kind == "file_containing_extension":
            ext = request.file_containing_extension
            file = index.extensions.get((ext.containing_type.lstrip("."), ext.extension_number))
        elif kind == "all_extension_numbers_of_type":
            name = request.all_extension_numbers_of_type.lstrip(".")
            numbers = index.extension_numbers.get(name)
            if numbers is None:
                return self._error(response, _NOT_FOUND, f"type not found: {name[:200]}")
            response.all_extension_numbers_response.base_type_name = name
            response.all_extension_numbers_response.extension_number.extend(numbers)
            return response
        elif kind == "list_services":
            for name in self.services:
                response.list_services_response.service.add(name=name)
            return response
        else:
            return self._error(response, _INVALID_ARGUMENT, "no request in the message")
        if file is None:
            return self._error(response, _NOT_FOUND, f"not found: {kind}")
        response.file_descriptor_response.file_descriptor_proto.extend(
            index.with_dependencies(file)
        )
        return response

    @staticmethod
    def _error(response: Response, code: int, message: str) -> Response:
        response.error_response.error_code = code
        response.error_response.error_message = message
        return response


def method_handlers(
    service: ReflectionService,
) -> dict[str, grpc.RpcMethodHandler[Request, Response]]:
    """ServerReflectionInfo's handler, the same for both service names."""
    return {
        "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
            service.ServerReflectionInfo,
            request_deserializer=Request.FromString,
            response_serializer=Response.SerializeToString,
        )
    }
