"""Renders deploy/monitoring/ for one service and lists what deploy.sh applies.

  python3 deploy/monitoring.py --service S --project P --out DIR
                               [--notify projects/P/notificationChannels/N]...
                               [--database '(default)'] [--error-ratio 0.01] [--p99-ms 1000]

Fills the placeholders of the log-based metrics, alert policies and dashboard
(${SERVICE}, ${PROJECT_ID}, ${DATABASE}, ${ERROR_RATIO}, ${P99_MS}, ${MAX_INSTANCES} from
deploy/service.yaml's maxScale, ${INSTANCE_ALERT} = 80% of it), adds the
notification channels to every policy, writes the results to DIR and prints
one tab-separated line per object: `metric NAME FILE`, `policy DISPLAY_NAME
FILE`, `dashboard DISPLAY_NAME FILE`. Standard library only (deploy.sh runs it
with the system python3).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "monitoring"
_PLACEHOLDER = re.compile(r"\$\{([A-Z][A-Z0-9_]*)\}")


def max_instances(manifest: Path = HERE / "service.yaml") -> int:
    found = re.search(r'autoscaling\.knative\.dev/maxScale:\s*"(\d+)"', manifest.read_text())
    if found is None:
        raise SystemExit(f"no autoscaling.knative.dev/maxScale in {manifest}")
    return int(found.group(1))


def values(
    service: str, project: str, error_ratio: float, p99_ms: int, database: str = "(default)"
) -> dict[str, str]:
    top = max_instances()
    return {
        "SERVICE": service,
        "PROJECT_ID": project,
        "DATABASE": database,
        "ERROR_RATIO": f"{error_ratio:g}",
        "P99_MS": str(p99_ms),
        "MAX_INSTANCES": str(top),
        "INSTANCE_ALERT": str(max(1, math.ceil(0.8 * top))),
    }


def render_text(text: str, names: dict[str, str]) -> str:
    out = _PLACEHOLDER.sub(lambda m: names.get(m.group(1), m.group(0)), text)
    left = _PLACEHOLDER.findall(out)
    if left:
        raise SystemExit(f"unrendered placeholders: {sorted(set(left))}")
    return out


def render(
    out: Path,
    service: str,
    project: str,
    *,
    notify: list[str] | None = None,
    error_ratio: float = 0.01,
    p99_ms: int = 1000,
    database: str = "(default)",
) -> list[tuple[str, str, Path]]:
    """Writes the rendered objects to out; returns (kind, name, file) for each."""
    names = values(service, project, error_ratio, p99_ms, database)
    made: list[tuple[str, str, Path]] = []
    for kind, pattern in (("metric", "log-metrics/*.json"), ("policy", "alerts/*.json")):
        for source in sorted(SOURCE.glob(pattern)):
            body = json.loads(render_text(source.read_text(), names))
            if kind == "policy":
                body["notificationChannels"] = list(notify or [])
            target = out / source.parent.name / source.name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(json.dumps(body, indent=2) + "\n")
            made.append((kind, body["name"] if kind == "metric" else body["displayName"], target))
    dashboard = json.loads(render_text((SOURCE / "dashboard.json").read_text(), names))
    target = out / "dashboard.json"
    target.write_text(json.dumps(dashboard, indent=2) + "\n")
    made.append(("dashboard", dashboard["displayName"], target))
    return made


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="deploy/monitoring.py", description=__doc__)
    parser.add_argument("--service", required=True)
    parser.add_argument("--project", required=True)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--notify", action="append", default=[])
    parser.add_argument("--database", default="(default)", help="the Firestore database id")
    parser.add_argument("--error-ratio", type=float, default=0.01)
    parser.add_argument("--p99-ms", type=int, default=1000)
    args = parser.parse_args(argv)
    for kind, name, path in render(
        args.out,
        args.service,
        args.project,
        notify=args.notify,
        error_ratio=args.error_ratio,
        p99_ms=args.p99_ms,
        database=args.database,
    ):
        print(f"{kind}\t{name}\t{path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
