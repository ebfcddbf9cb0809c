"""Cloud Run scaled out, on loopback: N TaskService instances (processes)
over one Firestore database (one project on the emulator).

Callers reach them as production does: through gRPC's own round_robin over a
target listing every instance (`round_robin_target`), or through nginx as
Cloud Run's front end (harness.frontend). `replace(i)` is one step of a
revision rollout: SIGTERM instance i, wait for it to drain and exit, start its
replacement on the same port.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from harness.servers import ServerProcess


@dataclass
class Replacement:
    """How one instance was replaced."""

    index: int
    exit_code: int
    drained_s: float  # SIGTERM to exit
    back_s: float  # SIGTERM to the replacement SERVING


class Cluster:
    def __init__(
        self,
        count: int,
        emulator_host: str,
        cwd: Path,
        *,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.project = f"demo-cluster-{uuid.uuid4().hex[:8]}"
        self.cwd = cwd
        self.env = {
            "TASKSERVICE_STORE": "firestore",
            "FIRESTORE_EMULATOR_HOST": emulator_host,
            "GOOGLE_CLOUD_PROJECT": self.project,
            "TASKSERVICE_GRACE_SECONDS": "5",
            **(env or {}),
        }
        self.instances = [ServerProcess(self.env, cwd) for _ in range(count)]
        self.outputs: list[str] = []  # of the instances replaced so far
        for instance in self.instances:
            instance.wait_serving()

    @property
    def ports(self) -> list[int]:
        return [i.port for i in self.instances]

    @property
    def targets(self) -> list[str]:
        return [i.target for i in self.instances]

    @property
    def round_robin_target(self) -> str:
        return "ipv4:" + ",".join(self.targets)

    def replace(self, index: int) -> Replacement:
        """Drains instance `index` (SIGTERM) and starts a new one on its port."""
        old = self.instances[index]
        started = time.monotonic()
        code, output = old.stop(timeout=15)
        drained = time.monotonic() - started
        self.outputs.append(output)
        new = ServerProcess(self.env, self.cwd, port=old.port)
        new.wait_serving()
        self.instances[index] = new
        return Replacement(index, code, round(drained, 2), round(time.monotonic() - started, 2))

    def stop(self) -> list[int]:
        codes = []
        for instance in self.instances:
            code, output = instance.stop()
            codes.append(code)
            self.outputs.append(output)
        return codes
