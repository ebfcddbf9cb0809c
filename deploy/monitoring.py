"""Renders deploy/monitoring/ for one service, and applies it to a project.

  python3 deploy/monitoring.py render --service S --project P --out DIR
                               [--notify projects/P/notificationChannels/N]...
                               [--database '(default)'] [--error-ratio 0.01] [--p99-ms 1000]
  python3 deploy/monitoring.py apply --project P DIR

render fills the placeholders of the log-based metrics, alert policies and
dashboard (${SERVICE}, ${PROJECT_ID}, ${DATABASE}, ${ERROR_RATIO}, ${P99_MS},
${MAX_INSTANCES} from deploy/service.yaml's maxScale, ${INSTANCE_ALERT} = 80%
of it), adds the notification channels to every policy, writes the results to
DIR and prints one tab-separated line per object: `metric NAME FILE`, `policy
DISPLAY_NAME FILE`, `dashboard DISPLAY_NAME FILE`. It needs the standard
library only.

apply creates or updates each rendered object through the Cloud APIs' own
client libraries (google-cloud-logging, google-cloud-monitoring,
google-cloud-monitoring-dashboards: `pip install -e '.[deploy]'`), because GA
gcloud has no command for alert policies (only `gcloud alpha monitoring
policies`). An object that exists is updated in place, so a second deploy
changes what differs and creates nothing twice: a log-based metric by its
name, an alert policy and the dashboard by their display names (the service
name is part of each). It calls the APIs as the account gcloud is logged in
with (`gcloud auth print-access-token`, the identity the rest of deploy.sh
uses) and prints one line per object: `created` or `updated`, and its name.
TASKSERVICE_CLOUD_API_ENDPOINT=HOST:PORT sends the calls to a local stand-in
for the three APIs instead (tests; loopback credentials).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "monitoring"
_PLACEHOLDER = re.compile(r"\$\{([A-Z][A-Z0-9_]*)\}")
# How apply gets its access token: the account deploy.sh's gcloud commands run as.
GCLOUD_TOKEN = ["gcloud", "auth", "print-access-token"]
TOKEN_LIFETIME = datetime.timedelta(minutes=10)  # asked again after that (gcloud caches it)


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


def _gcloud_credentials(project: str) -> Any:
    """Credentials that take their token from gcloud, billed to the project."""
    from google.oauth2.credentials import Credentials

    def token(_request: Any, scopes: Any = None) -> tuple[str, datetime.datetime]:
        done = subprocess.run(GCLOUD_TOKEN, capture_output=True, text=True)
        if done.returncode != 0 or not done.stdout.strip():
            raise SystemExit(f"{' '.join(GCLOUD_TOKEN)} failed: {done.stderr.strip()}")
        now = datetime.datetime.now(datetime.UTC).replace(tzinfo=None)
        return done.stdout.strip(), now + TOKEN_LIFETIME

    return Credentials(token=None, refresh_handler=token, quota_project_id=project)


def _clients(project: str) -> tuple[Any, Any, Any]:
    """The three API clients: Google's endpoints, or TASKSERVICE_CLOUD_API_ENDPOINT."""
    from google.cloud.logging_v2.services.metrics_service_v2 import MetricsServiceV2Client
    from google.cloud.logging_v2.services.metrics_service_v2.transports import (
        MetricsServiceV2GrpcTransport,
    )
    from google.cloud.monitoring_dashboard_v1 import DashboardsServiceClient
    from google.cloud.monitoring_dashboard_v1.services.dashboards_service.transports import (
        DashboardsServiceGrpcTransport,
    )
    from google.cloud.monitoring_v3 import AlertPolicyServiceClient
    from google.cloud.monitoring_v3.services.alert_policy_service.transports import (
        AlertPolicyServiceGrpcTransport,
    )

    credentials = _gcloud_credentials(project)
    endpoint = os.environ.get("TASKSERVICE_CLOUD_API_ENDPOINT", "").strip()
    if not endpoint:
        return (
            MetricsServiceV2Client(credentials=credentials),
            AlertPolicyServiceClient(credentials=credentials),
            DashboardsServiceClient(credentials=credentials),
        )
    import grpc
    from google.auth.transport.grpc import AuthMetadataPlugin
    from google.auth.transport.requests import Request

    # Loopback only: local credentials carry the bearer token as TLS would.
    channel = grpc.secure_channel(
        endpoint,
        grpc.composite_channel_credentials(
            grpc.local_channel_credentials(grpc.LocalConnectionType.LOCAL_TCP),
            grpc.metadata_call_credentials(AuthMetadataPlugin(credentials, Request())),
        ),
    )
    return (
        MetricsServiceV2Client(transport=MetricsServiceV2GrpcTransport(channel=channel)),
        AlertPolicyServiceClient(transport=AlertPolicyServiceGrpcTransport(channel=channel)),
        DashboardsServiceClient(transport=DashboardsServiceGrpcTransport(channel=channel)),
    )


def apply(directory: Path, project: str) -> list[tuple[str, str, str]]:
    """Creates or updates what render wrote to directory; returns
    (kind, name, "created" | "updated") for each object, in order."""
    from google.api_core import exceptions
    from google.cloud.logging_v2.types import LogMetric
    from google.cloud.monitoring_dashboard_v1.types import Dashboard
    from google.cloud.monitoring_v3.types import AlertPolicy

    metrics, policies, dashboards = _clients(project)
    parent = f"projects/{project}"
    done: list[tuple[str, str, str]] = []

    for path in sorted((directory / "log-metrics").glob("*.json")):
        metric = LogMetric.from_json(path.read_text())
        name = f"{parent}/metrics/{metric.name}"
        try:
            metrics.get_log_metric(metric_name=name)
        except exceptions.NotFound:
            metrics.create_log_metric(parent=parent, metric=metric)
            done.append(("metric", metric.name, "created"))
        else:
            metrics.update_log_metric(metric_name=name, metric=metric)
            done.append(("metric", metric.name, "updated"))

    existing = {}
    for policy in policies.list_alert_policies(name=parent):
        existing.setdefault(policy.display_name, policy.name)  # the first of a name
    for path in sorted((directory / "alerts").glob("*.json")):
        policy = AlertPolicy.from_json(path.read_text())
        if policy.display_name in existing:
            policy.name = existing[policy.display_name]
            policies.update_alert_policy(alert_policy=policy)
            done.append(("policy", policy.display_name, "updated"))
        else:
            policies.create_alert_policy(name=parent, alert_policy=policy)
            done.append(("policy", policy.display_name, "created"))

    dashboard = Dashboard.from_json((directory / "dashboard.json").read_text())
    current = None
    for candidate in dashboards.list_dashboards(parent=parent):
        if candidate.display_name == dashboard.display_name:
            current = candidate
            break
    if current is not None:
        dashboard.name, dashboard.etag = current.name, current.etag  # the etag: no lost update
        dashboards.update_dashboard(request={"dashboard": dashboard})
        done.append(("dashboard", dashboard.display_name, "updated"))
    else:
        dashboards.create_dashboard(parent=parent, dashboard=dashboard)
        done.append(("dashboard", dashboard.display_name, "created"))
    return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="deploy/monitoring.py", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("render", help="fill in the placeholders, write to --out")
    make.add_argument("--service", required=True)
    make.add_argument("--project", required=True)
    make.add_argument("--out", required=True, type=Path)
    make.add_argument("--notify", action="append", default=[])
    make.add_argument("--database", default="(default)", help="the Firestore database id")
    make.add_argument("--error-ratio", type=float, default=0.01)
    make.add_argument("--p99-ms", type=int, default=1000)
    put = commands.add_parser("apply", help="create or update what render wrote")
    put.add_argument("--project", required=True)
    put.add_argument("directory", type=Path)
    args = parser.parse_args(argv)
    if args.command == "apply":
        for kind, name, outcome in apply(args.directory, args.project):
            print(f"{kind}\t{name}\t{outcome}", flush=True)
        return 0
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
