"""The official Cloud Firestore emulator: finding its jar and running it.

The emulator is started with java directly (not through the gcloud wrapper,
which forks java), so the process is the server itself and signals reach it.
Where the jar or java is missing, emulator_jar() returns None and callers skip.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path

import grpc

from harness.net import free_port, wait_for_port
from taskservice.store.channels import CHANNEL_OPTIONS, canonical_target
from taskservice.store.firestore import FirestoreStore

# Where Google Cloud SDK installs put the emulator (Debian package, archive
# installs); FIRESTORE_EMULATOR_JAR overrides, and a gcloud on PATH is followed.
_JAR = "platform/cloud-firestore-emulator/cloud-firestore-emulator.jar"
_SDK_ROOTS = ("/usr/lib/google-cloud-sdk", "/usr/share/google-cloud-sdk", "~/google-cloud-sdk")


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


def launch_emulator(
    jar: str, port: int, log: Path | None = None, heap: str = "512m"
) -> subprocess.Popen[bytes]:
    """Starts the official emulator on 127.0.0.1:port (java directly, so the
    process is the server itself and signals reach it), with heap as the
    JVM's maximum heap. It keeps every document in that heap."""
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
            env={**os.environ, "JAVA_TOOL_OPTIONS": f"-Xmx{heap}"},
        )
    finally:
        if log is not None:
            out.close()  # type: ignore[union-attr]


@dataclass
class Emulator:
    host: str
    process: subprocess.Popen[bytes]

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()


def start_emulator(jar: str, log: Path, timeout: float = 60) -> Emulator:
    """The emulator on a free loopback port, once it accepts connections."""
    port = free_port()
    process = launch_emulator(jar, port, log)
    if not wait_for_port("127.0.0.1", port, timeout):
        process.kill()
        raise RuntimeError(f"the Firestore emulator did not start; see {log}")
    return Emulator(f"127.0.0.1:{port}", process)


def firestore_store(
    host: str,
    interceptors: list[grpc.aio.ClientInterceptor] | None = None,
    *,
    project: str | None = None,
    watch_retention_seconds: float = 3540.0,
) -> FirestoreStore:
    """A FirestoreStore on the emulator at host, in a project of its own (so
    nothing another test wrote is seen, and queries stay small) unless
    `project` names one (two stores as two instances of one service)."""
    channel = grpc.aio.insecure_channel(host, options=CHANNEL_OPTIONS, interceptors=interceptors)
    listen = grpc.aio.insecure_channel(
        host, options=[*CHANNEL_OPTIONS, ("taskservice.channel_purpose", "listen")]
    )
    return FirestoreStore(
        channel,
        project=project or f"demo-t{uuid.uuid4().hex[:12]}",
        extra_metadata=(("authorization", "Bearer owner"),),
        watch_retention_seconds=watch_retention_seconds,
        listen_channel=listen,
        verify_listen=True,
        target=canonical_target(host),
    )
