"""The deploy plan (dry run), the Cloud Run manifest and the Dockerfile lint clean.

Every command of the plan is checked against the installed gcloud (GA track,
offline: the command exists, and so does each flag it passes), and a real run,
with a gcloud that records what it is asked and a local stand-in for the Cloud
APIs that deploy/monitoring.py calls, executes exactly the commands the dry
run printed; run twice, the second run updates what the first created.
"""

from __future__ import annotations

import functools
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from harness.cloudapi import start_cloud_apis

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _tool(name: str) -> str:
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed; pip install -e '.[dev]'")
    return found


def _deploy(*extra: str, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        [
            "bash",
            str(DEPLOY / "deploy.sh"),
            "--project",
            "demo-proj",
            "--region",
            "europe-west1",
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHON": sys.executable, **(env or {})},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def _dry_run(*extra: str) -> str:
    return _deploy("--dry-run", *extra)


# Every option deploy.sh has, so that every branch of the plan is printed.
EVERYTHING = (
    "--build",
    "--invoker",
    "serviceAccount:caller@demo-proj.iam.gserviceaccount.com",
    "--notify",
    "projects/demo-proj/notificationChannels/42",
)


def _planned(out: str) -> list[list[str]]:
    """The commands of the printed plan, in order: `A || B` is A, then B."""
    commands = []
    for line in out.splitlines():
        if line.startswith("+ "):
            commands += [shlex.split(part) for part in line[2:].split(" || ")]
    return commands


def test_dry_run_prints_the_whole_plan_in_order() -> None:
    out = _dry_run(
        "--invoker",
        "serviceAccount:caller@demo-proj.iam.gserviceaccount.com",
        "--invoker",
        "serviceAccount:other@demo-proj.iam.gserviceaccount.com",
        "--build",
    )
    commands = [line[2:] for line in out.splitlines() if line.startswith("+ ")]
    apply = f"{sys.executable} {DEPLOY / 'monitoring.py'} apply --project demo-proj "
    assert all(c.startswith("gcloud ") for c in commands if not c.startswith(apply))
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
    telemetry = {"roles/monitoring.metricWriter", "roles/telemetry.tracesWriter"}
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
    """docs/reports/capacity.md is computed from docs/reports/benchmarks.json and
    docs/reports/workers.json: after a benchmark run, regenerate it (the test says so)."""
    out = tmp_path / "capacity.md"
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "capacity_report.py"), str(out)],
        check=True,
        capture_output=True,
    )
    assert out.read_text() == (ROOT / "docs" / "reports" / "capacity.md").read_text(), (
        "docs/reports/capacity.md is stale: run python scripts/capacity_report.py"
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


@functools.cache
def _gcloud_help(path: tuple[str, ...]) -> str | None:
    """`gcloud PATH --help` without its ANSI escapes, or None when PATH is not
    a GA command or group."""
    gcloud = shutil.which("gcloud")
    assert gcloud is not None
    result = subprocess.run(
        [gcloud, *path, "--help"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "CLOUDSDK_CORE_DISABLE_PROMPTS": "1"},
    )
    return ANSI.sub("", result.stdout) if result.returncode == 0 else None


def _subcommands(help_text: str) -> set[str]:
    """The groups and commands a group's help lists (none for a command)."""
    names: set[str] = set()
    section = ""
    for line in help_text.splitlines():
        if re.fullmatch(r"[A-Z][A-Z ]+", line):
            section = line
        elif section in ("GROUPS", "COMMANDS"):
            entry = re.fullmatch(r" {5}([a-z][a-z0-9-]*)", line)
            if entry:
                names.add(entry.group(1))
    return names


def _choices(help_text: str, flag: str) -> set[str] | None:
    """The values a flag's help allows (`TYPE must be one of: a, b.`), if it says."""
    metavar = re.search(rf"(?<![\w-]){re.escape(flag)}=([A-Z][A-Z0-9_]*)", help_text)
    if metavar is None:
        return None
    flat = " ".join(help_text.split())
    listed = re.search(
        rf"\b{metavar.group(1)} must be one of: ([a-z0-9-]+(?:, [a-z0-9-]+)*)\.", flat
    )
    return set(listed.group(1).split(", ")) if listed else None


def _gcloud_problems(argv: list[str]) -> list[str]:
    """What is wrong with one gcloud command line: a path that is not a GA
    command, a flag its help does not name, or a value outside the ones a
    flag's help lists."""
    assert argv[0] == "gcloud", argv
    path: list[str] = []
    for token in argv[1:]:
        if token.startswith("-"):
            break
        parent = _gcloud_help(tuple(path))
        if parent is None or token not in _subcommands(parent):
            break
        path.append(token)
    text = _gcloud_help(tuple(path))
    shown = " ".join(["gcloud", *path])
    if text is None or not path or _subcommands(text):
        return [f"{shlex.join(argv)}: `{shown}` is not a GA gcloud command"]
    problems = []
    args = argv[len(path) + 1 :]
    for i, token in enumerate(args):
        if token.startswith("--"):
            flag, eq, value = token.partition("=")
            if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text):
                problems.append(f"{shown}: no flag {flag} in its help")
                continue
            allowed = _choices(text, flag)
            if not eq and i + 1 < len(args):
                value = args[i + 1]
            if allowed is not None and value not in allowed:
                problems.append(f"{shown}: {flag} {value} is not one of {sorted(allowed)}")
    return problems


def test_every_planned_command_exists_in_ga_gcloud() -> None:
    """Offline: each command path of the plan is a GA gcloud command (its
    `--help` exits 0 and lists no subcommands), and each flag it passes is in
    that help. Also the command deploy/monitoring.py gets its token with."""
    if shutil.which("gcloud") is None:
        pytest.skip("gcloud is not installed: the deploy plan was NOT checked against gcloud")
    sys.path.insert(0, str(DEPLOY))
    try:
        import monitoring  # deploy/monitoring.py
    finally:
        sys.path.remove(str(DEPLOY))
    out = _dry_run(*EVERYTHING)
    planned = _planned(out) + _planned(_dry_run("--telemetry", "off"))
    # and the commands its closing hints tell the operator to run
    hints = re.findall(r"\$\((gcloud (?:[^()']|'[^']*')*)\)", out)
    assert len(hints) == 2, hints
    gcloud = [argv for argv in planned if argv[0] == "gcloud"]
    gcloud += [shlex.split(hint) for hint in hints]
    others = [argv for argv in planned if argv[0] != "gcloud"]
    apply = [sys.executable, str(DEPLOY / "monitoring.py"), "apply", "--project", "demo-proj"]
    assert len(others) == 2 and all(argv[:5] == apply for argv in others), others
    distinct = {tuple(argv) for argv in [*gcloud, monitoring.GCLOUD_TOKEN]}
    problems = [p for argv in sorted(distinct) for p in _gcloud_problems(list(argv))]
    assert not problems, "\n".join(problems)
    assert len(distinct) > 70  # the 60 composite indexes among them


def test_the_checker_catches_what_ga_gcloud_lacks() -> None:
    if shutil.which("gcloud") is None:
        pytest.skip("gcloud is not installed: the gcloud checker was NOT exercised")
    policies = "gcloud monitoring policies create --policy-from-file p.json --project p"
    assert _gcloud_problems(shlex.split(policies)) == [
        f"{policies}: `gcloud monitoring` is not a GA gcloud command"
    ]
    assert _gcloud_problems(shlex.split("gcloud logging metrics create m --no-such-flag x")) == [
        "gcloud logging metrics create: no flag --no-such-flag in its help"
    ]
    assert _gcloud_problems(shlex.split("gcloud run services")) != []  # a group, not a command
    good = "gcloud logging metrics create m --config-from-file f"
    assert _gcloud_problems(shlex.split(good)) == []
    wrong = "gcloud firestore databases create --type firestore --location x"
    assert _gcloud_problems(shlex.split(wrong)) == [
        "gcloud firestore databases create: --type firestore is not one of"
        " ['datastore-mode', 'firestore-native']"
    ]
    scope = "gcloud firestore indexes composite create --query-scope=collection --async"
    assert _gcloud_problems(shlex.split(scope)) == []


FAKE_GCLOUD = """#!/usr/bin/env bash
# Records each command (shell-quoted, one a line) and succeeds; `describe`
# fails while FAKE_GCLOUD_EMPTY=1 (a project with nothing in it yet); the
# first FAKE_GCLOUD_IAM_LAG IAM bindings fail as IAM does while a new service
# account is not yet visible to it.
printf '%q ' gcloud "$@" | sed 's/ $//' >> "$FAKE_GCLOUD_LOG"
echo >> "$FAKE_GCLOUD_LOG"
case "$*" in
  "auth print-access-token") echo "$FAKE_GCLOUD_TOKEN" ;;
  *" describe "*) [ "$FAKE_GCLOUD_EMPTY" = 1 ] && { echo "NOT_FOUND" >&2; exit 1; } ;;
  *"add-iam-policy-binding"*)
    failed=$(cat "$FAKE_GCLOUD_LOG.lag" 2>/dev/null || echo 0)
    if [ "$failed" -lt "${FAKE_GCLOUD_IAM_LAG:-0}" ]; then
      echo $((failed + 1)) > "$FAKE_GCLOUD_LOG.lag"
      echo "ERROR: (gcloud.projects.add-iam-policy-binding) INVALID_ARGUMENT:" \\
        "Service account taskservice-run@demo-proj.iam.gserviceaccount.com does not exist." >&2
      exit 1
    fi
    echo "bindings: [the whole policy]" ;;
esac
exit 0
"""


def test_a_real_run_executes_what_the_dry_run_printed_and_a_second_one_updates(
    tmp_path: Path,
) -> None:
    """deploy.sh for real, with gcloud replaced by a recorder and the Cloud
    APIs by a local stand-in: what it runs is what the dry run printed, in
    order, and a second deploy into the same project updates (no failure,
    nothing created twice)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "gcloud"
    fake.write_text(FAKE_GCLOUD)
    fake.chmod(0o755)
    log = tmp_path / "gcloud.log"
    apis = start_cloud_apis("ya29.test-token")
    try:
        env = {
            "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
            "TMPDIR": str(tmp_path),
            "FAKE_GCLOUD_LOG": str(log),
            "FAKE_GCLOUD_TOKEN": "ya29.test-token",
            "TASKSERVICE_CLOUD_API_ENDPOINT": apis.endpoint,
        }
        temp = re.compile(re.escape(str(tmp_path)) + r"/taskservice-(service|monitoring)\.\w+")

        def plan(out: str) -> list[str]:
            return [temp.sub(r"<\1>", line) for line in out.splitlines() if line.startswith("+ ")]

        dry = _deploy("--dry-run", *EVERYTHING, env=env)
        assert not log.exists()  # the dry run ran nothing
        outcomes = []
        for empty in ("1", "0"):
            log.unlink(missing_ok=True)
            out = _deploy(*EVERYTHING, env={**env, "FAKE_GCLOUD_EMPTY": empty})
            assert plan(out) == plan(dry)  # it printed the same plan
            ran = [shlex.split(temp.sub(r"<\1>", line)) for line in log.read_text().splitlines()]
            token = ["gcloud", "auth", "print-access-token"]
            assert token in ran  # deploy/monitoring.py's credentials: gcloud's account
            ran = [argv for argv in ran if argv != token]
            expected = []
            for line in plan(dry):
                parts = [shlex.split(part) for part in line[2:].split(" || ")]
                if parts[0][0] != "gcloud":
                    continue  # deploy/monitoring.py apply: its calls are below
                # `CHECK || CREATE`: CREATE runs only when CHECK (describe) failed
                expected += parts if empty == "1" else parts[:1]
            assert ran == expected
            outcomes.append(re.findall(r"^(metric|policy|dashboard)\t.*\t(\w+)$", out, re.M))
        first, second = outcomes
        assert [o for _, o in first] == ["created"] * 7
        assert [o for _, o in second] == ["updated"] * 7
        assert (len(apis.metrics), len(apis.policies), len(apis.dashboards)) == (2, 4, 1)
        policy = next(iter(apis.policies.values()))
        assert list(policy.notification_channels) == ["projects/demo-proj/notificationChannels/42"]
    finally:
        apis.stop()


def test_cpu_stays_allocated_between_requests(tmp_path: Path) -> None:
    """Access lines are written just after a response and OpenTelemetry exports
    on background threads: the manifest keeps CPU allocated between requests
    (instance-based billing), the schema insists on it, and docs/reports/capacity.md
    states what it costs."""
    import yaml

    manifest = yaml.safe_load((DEPLOY / "service.yaml").read_text())
    annotations = manifest["spec"]["template"]["metadata"]["annotations"]
    assert annotations["run.googleapis.com/cpu-throttling"] == "false"
    throttled = (
        (DEPLOY / "service.yaml")
        .read_text()
        .replace('cpu-throttling: "false"', 'cpu-throttling: "true"')
    )
    path = tmp_path / "throttled.yaml"
    path.write_text(throttled)
    schema = subprocess.run(
        [_tool("check-jsonschema"), "--schemafile", str(DEPLOY / "service.schema.json"), str(path)],
        capture_output=True,
        text=True,
    )
    assert schema.returncode != 0 and "cpu-throttling" in schema.stdout
    capacity = (ROOT / "docs" / "reports" / "capacity.md").read_text()
    section = capacity.split("## CPU between requests", 1)[1].split("\n## ", 1)[0]
    assert "instance-based" in section and "per month" in section
    assert re.search(r"no request in flight", section)  # the measurement is in it


def test_a_new_service_accounts_bindings_wait_until_iam_sees_it(tmp_path: Path) -> None:
    """A service account created a moment ago is not yet visible to IAM (its
    binding fails with "does not exist" for a few seconds): a first deploy
    retries that binding instead of stopping; any other failure stops it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "gcloud"
    fake.write_text(FAKE_GCLOUD)
    fake.chmod(0o755)
    log = tmp_path / "gcloud.log"
    apis = start_cloud_apis("ya29.test-token")
    try:
        env = {
            "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
            "TMPDIR": str(tmp_path),
            "FAKE_GCLOUD_LOG": str(log),
            "FAKE_GCLOUD_TOKEN": "ya29.test-token",
            "FAKE_GCLOUD_EMPTY": "1",
            "FAKE_GCLOUD_IAM_LAG": "1",
            "TASKSERVICE_CLOUD_API_ENDPOINT": apis.endpoint,
        }
        out = _deploy(env=env)
        assert "IAM does not see the new service account yet" in out
        ran = [shlex.split(line) for line in log.read_text().splitlines()]
        bindings = [argv for argv in ran if "add-iam-policy-binding" in argv]
        assert [argv[argv.index("--role") + 1] for argv in bindings] == [
            "roles/datastore.user",  # refused once, then granted
            "roles/datastore.user",
            "roles/monitoring.metricWriter",
            "roles/telemetry.tracesWriter",
        ]
        assert "bindings:" not in out  # the policy dump is not shown
    finally:
        apis.stop()
