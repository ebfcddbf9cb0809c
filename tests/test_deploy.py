"""The deploy plan (dry run), the Cloud Run manifest and the Dockerfile lint clean."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"


def _tool(name: str) -> str:
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed; pip install -e '.[dev]'")
    return found


def _dry_run(*extra: str) -> str:
    result = subprocess.run(
        [
            "bash",
            str(DEPLOY / "deploy.sh"),
            "--project",
            "demo-proj",
            "--region",
            "europe-west1",
            "--dry-run",
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_dry_run_prints_the_whole_plan_in_order() -> None:
    out = _dry_run(
        "--invoker",
        "serviceAccount:caller@demo-proj.iam.gserviceaccount.com",
        "--invoker",
        "serviceAccount:other@demo-proj.iam.gserviceaccount.com",
        "--build",
    )
    commands = [line[2:] for line in out.splitlines() if line.startswith("+ ")]
    assert all(c.startswith("gcloud ") for c in commands)
    steps = [
        "gcloud services enable run.googleapis.com firestore.googleapis.com",
        "gcloud iam service-accounts describe taskservice-run@demo-proj.iam.gserviceaccount.com",
        "gcloud projects add-iam-policy-binding demo-proj",
        "gcloud firestore databases describe",
        "gcloud firestore indexes composite create",
        "gcloud firestore indexes fields update title",
        "gcloud firestore fields ttls update expire_time --collection-group=tasks-requests",
        "gcloud builds submit",
        "gcloud run services replace",
        "gcloud run services add-iam-policy-binding taskservice",
    ]
    positions = [next(i for i, c in enumerate(commands) if c.startswith(s)) for s in steps]
    assert positions == sorted(positions), "steps out of order"
    roles = re.findall(r"--role (\S+)", "\n".join(commands))
    assert roles.count("roles/datastore.user") == 1  # the runtime account's data access
    assert roles.count("roles/run.invoker") == 2
    # and, with --telemetry gcp (the default), writing metrics and traces only
    telemetry = {"roles/monitoring.metricWriter", "roles/cloudtrace.agent"}
    assert set(roles) == {"roles/datastore.user", "roles/run.invoker", *telemetry}
    quiet = _dry_run("--telemetry", "off")
    assert not telemetry & set(re.findall(r"--role (\S+)", quiet))
    assert "allUsers" not in out and "--allow-unauthenticated" not in out
    assert sum(c.startswith("gcloud firestore indexes composite create") for c in commands) == 60
    assert 'grpcurl -H "authorization: Bearer $(gcloud auth print-identity-token)"' in out


def test_rendered_manifest_is_valid_and_complete(tmp_path: Path) -> None:
    out = _dry_run("--image", "europe-west1-docker.pkg.dev/demo-proj/taskservice/taskservice:v1")
    rendered = Path(re.search(r"# rendered manifest: (\S+)", out).group(1))  # type: ignore[union-attr]
    try:
        text = rendered.read_text()
        assert "${" not in text
        assert "image: europe-west1-docker.pkg.dev/demo-proj/taskservice/taskservice:v1" in text
        assert "serviceAccountName: taskservice-run@demo-proj.iam.gserviceaccount.com" in text
        for manifest in (DEPLOY / "service.yaml", rendered):
            lint = subprocess.run(
                [_tool("yamllint"), "-s", "-c", str(ROOT / ".yamllint.yaml"), str(manifest)],
                capture_output=True,
                text=True,
            )
            assert lint.returncode == 0, lint.stdout + lint.stderr
            schema = subprocess.run(
                [
                    _tool("check-jsonschema"),
                    "--schemafile",
                    str(DEPLOY / "service.schema.json"),
                    str(manifest),
                ],
                capture_output=True,
                text=True,
            )
            assert schema.returncode == 0, schema.stdout + schema.stderr
    finally:
        rendered.unlink()


def test_schema_rejects_a_broken_manifest(tmp_path: Path) -> None:
    broken = (DEPLOY / "service.yaml").read_text().replace("name: h2c", "name: http1")
    path = tmp_path / "broken.yaml"
    path.write_text(broken)
    schema = subprocess.run(
        [_tool("check-jsonschema"), "--schemafile", str(DEPLOY / "service.schema.json"), str(path)],
        capture_output=True,
        text=True,
    )
    assert schema.returncode != 0


def test_deploy_requires_project_and_region() -> None:
    result = subprocess.run(
        ["bash", str(DEPLOY / "deploy.sh"), "--dry-run"], capture_output=True, text=True
    )
    assert result.returncode == 2 and "--project and --region are required" in result.stderr


def test_dockerfile_is_hadolint_clean() -> None:
    result = subprocess.run(
        [_tool("hadolint"), str(ROOT / "Dockerfile")], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_help_prints_the_usage_and_nothing_else() -> None:
    result = subprocess.run(
        ["bash", str(ROOT / "deploy" / "deploy.sh"), "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0
    assert result.stdout.startswith("Deploys TaskService to Cloud Run")
    assert "--dry-run prints the plan" in result.stdout
    assert "set -euo" not in result.stdout and "#" not in result.stdout


def test_the_capacity_model_is_what_its_generator_makes_of_the_measurements(
    tmp_path: Path,
) -> None:
    """docs/capacity.md is computed from docs/benchmarks.json and
    docs/workers.json: after a benchmark run, regenerate it (the test says so)."""
    out = tmp_path / "capacity.md"
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "capacity_report.py"), str(out)],
        check=True,
        capture_output=True,
    )
    assert out.read_text() == (ROOT / "docs" / "capacity.md").read_text(), (
        "docs/capacity.md is stale: run python scripts/capacity_report.py"
    )


def test_watch_streams_end_before_cloud_runs_request_timeout() -> None:
    """The server ends a WatchTasks stream (with a resume token) before Cloud
    Run would cut it without one, with minutes to spare, and the progress
    events come well within the idle timeouts of proxies in between
    (nginx's default is 60 s)."""
    import yaml

    from taskservice.config import load

    manifest = yaml.safe_load((DEPLOY / "service.yaml").read_text())
    request_timeout = manifest["spec"]["template"]["spec"]["timeoutSeconds"]
    env = {
        e["name"]: e["value"] for e in manifest["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    config = load({k: v for k, v in env.items() if not v.startswith("$")})
    assert config.watch_max_seconds <= request_timeout - 240
    assert config.watch_progress_seconds <= 30
