"""Process helpers shared by the tests and the benchmark harness: free ports,
waiting for a port, and finding and starting the Cloud Firestore emulator."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

# Where Google Cloud SDK installs put the emulator (Debian package, archive
# installs); FIRESTORE_EMULATOR_JAR overrides, and a gcloud on PATH is followed.
_JAR = "platform/cloud-firestore-emulator/cloud-firestore-emulator.jar"
_SDK_ROOTS = ("/usr/lib/google-cloud-sdk", "/usr/share/google-cloud-sdk", "~/google-cloud-sdk")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(host: str, port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return True
        except OSError:
            time.sleep(0.1)
    return False


def emulator_jar() -> str | None:
    """The Cloud Firestore emulator jar, or None when it (or java) is absent."""
    if shutil.which("java") is None:
        return None
    if os.environ.get("FIRESTORE_EMULATOR_JAR"):
        candidates = [Path(os.environ["FIRESTORE_EMULATOR_JAR"])]
    else:
        roots = [Path(r).expanduser() for r in _SDK_ROOTS]
        if os.environ.get("CLOUDSDK_ROOT_DIR"):
            roots.insert(0, Path(os.environ["CLOUDSDK_ROOT_DIR"]))
        gcloud = shutil.which("gcloud")
        if gcloud:
            roots.insert(0, Path(gcloud).resolve().parent.parent)
        candidates = [root / _JAR for root in roots]
    return next((str(c) for c in candidates if c.is_file()), None)


def launch_emulator(jar: str, port: int, log: Path | None = None) -> subprocess.Popen[bytes]:
    """Starts the official emulator on 127.0.0.1:port (java directly, so the
    process is the server itself and signals reach it)."""
    out = log.open("wb") if log is not None else subprocess.DEVNULL
    try:
        return subprocess.Popen(
            [
                "java",
                "-Duser.language=en",
                "-cp",
                jar,
                "com.google.cloud.datastore.emulator.firestore.CloudFirestore",
                "start",
                "--host=127.0.0.1",
                f"--port={port}",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "JAVA_TOOL_OPTIONS": "-Xmx512m"},
        )
    finally:
        if log is not None:
            out.close()  # type: ignore[union-attr]


@dataclass
class CallCounter:
    """Counts Firestore RPCs (by method), documents returned (billed reads) and
    documents written by successful commits (billed writes), on the real channel."""

    calls: dict[str, int] = field(default_factory=dict)
    documents: int = 0
    written: int = 0

    def reset(self) -> None:
        self.calls.clear()
        self.documents = 0
        self.written = 0

    def count(self, details: Any) -> str:
        method = details.method.decode() if isinstance(details.method, bytes) else details.method
        name: str = method.rsplit("/", 1)[-1]
        self.calls[name] = self.calls.get(name, 0) + 1
        return name

    def interceptors(self) -> list[grpc.aio.ClientInterceptor]:
        return [_CountUnary(self), _CountStream(self)]


class _CountUnary(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, counter: CallCounter) -> None:
        self.counter = counter

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        name = self.counter.count(details)
        call = await continuation(details, request)
        if name in ("GetDocument", "Commit"):
            try:
                await call
            except grpc.aio.AioRpcError:
                return call
            if name == "GetDocument":
                self.counter.documents += 1
            else:
                self.counter.written += len(request.writes)
        return call


class _CountStream(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, counter: CallCounter) -> None:
        self.counter = counter

    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        self.counter.count(details)
        call = await continuation(details, request)
        counter = self.counter

        async def counted() -> AsyncIterator[Any]:
            async for response in call:
                kind = "document" if response.DESCRIPTOR.name == "RunQueryResponse" else "found"
                if response.HasField(kind):
                    counter.documents += 1
                yield response

        return counted()
