"""The benchmark harness's promises that need no benchmark run: where a run
writes, what its help says, and that it names only files it wrote."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.__main__ import FULL_MINUTES, QUICK_MINUTES, ROOT, build_parser, output_dir

_WITHOUT_MATPLOTLIB = """
import json, sys
from pathlib import Path
from typing import Any
sys.modules["matplotlib"] = None  # as on a machine without the bench extra
from bench.__main__ import write_outputs
from bench.report import _int_keys
results = _int_keys(json.loads(Path(sys.argv[1]).read_text()))
print(write_outputs(results, Path(sys.argv[2])))
"""


def test_a_quick_run_writes_outside_the_tracked_docs_unless_asked(tmp_path: Path) -> None:
    docs = (ROOT / "docs").resolve()
    quick = output_dir(quick=True, out=None).resolve()
    assert docs not in (quick, *quick.parents) and ROOT.resolve() not in quick.parents
    assert quick.is_dir() and not any(quick.iterdir())  # a new directory of its own
    quick.rmdir()
    assert output_dir(quick=True, out=str(tmp_path)) == tmp_path  # asked
    assert output_dir(quick=False, out=None) == ROOT / "docs" / "reports"


def test_the_help_states_the_measured_times_and_where_a_quick_run_writes() -> None:
    text = " ".join(build_parser().format_help().split())
    assert f"about {QUICK_MINUTES} minutes on a 2-core machine" in text
    assert f"a full run: about {FULL_MINUTES}" in text
    assert "about a minute" not in text  # issue 19: --quick took 216 s
    assert QUICK_MINUTES * 60 >= 216
    assert "temporary directory" in text


def test_a_run_names_only_the_files_it_wrote(tmp_path: Path) -> None:
    """Without matplotlib there is no chart, and the run says so instead of
    claiming one."""
    figures = ROOT / "docs" / "reports" / "benchmarks.json"  # a real run's raw figures
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-c", _WITHOUT_MATPLOTLIB, str(figures), str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    wrote, why = result.stdout.strip().splitlines()
    named = [Path(p) for p in wrote.removeprefix("wrote ").split(", ")]
    assert sorted(p.name for p in named) == ["benchmarks.json", "benchmarks.md"]
    assert all(p.is_file() for p in named)
    assert not (out / "benchmarks.png").exists()
    assert "no chart: matplotlib is not installed" in why
    assert "benchmarks.png" not in (out / "benchmarks.md").read_text()
    assert json.loads((out / "benchmarks.json").read_text())["versions"]


def _figures() -> dict[str, Any]:
    """A real run's raw figures (docs/reports/benchmarks.json), keys as a run has them."""
    from bench.report import _int_keys

    path = ROOT / "docs" / "reports" / "benchmarks.json"
    figures: dict[str, Any] = _int_keys(json.loads(path.read_text()))
    return figures


def test_the_targets_are_issue_20s_and_each_reads_its_own_figure(tmp_path: Path) -> None:
    from bench.report import _targets, write_report

    r = _figures()
    real = r["sqlite_vs_echo"]["rounds"][0]
    r["sqlite_vs_echo"] = {  # the medians are what the targets read
        "rounds": [
            {**real, "get_cpu_us": 190.0, "echo_cpu_us": 100.0, "create_ratio": 0.7},
            {**real, "get_cpu_us": 110.0, "echo_cpu_us": 100.0, "create_ratio": 0.5},
        ],
        "get_ratio": 0.5,
        "create_ratio": 0.61,
        "cpu_ratio": 1.19,
    }
    for store, ratio in (("sqlite", 4.9), ("firestore", 5.1)):
        r["stores"][store]["batch_10_vs_create"] = {
            "pairs": 7,
            "batch_p50_ms": 4.9,
            "batch_p99_ms": 9.0,
            "create_p50_ms": 1.0,
            "create_p99_ms": 2.0,
            "p50_ratio": ratio,
        }
    telemetry = json.loads((ROOT / "docs" / "reports" / "telemetry.json").read_text())
    telemetry["modes"]["on"]["cpu_vs_off"] = 1.16
    met = {t: ok for t, _, ok in _targets(r, telemetry)}
    assert not any("≥ 70%" in t and "SQLite" in t for t in met)  # the old targets are gone
    assert not any("1.5x" in t for t in met)
    [cpu] = [ok for t, ok in met.items() if t.startswith("server CPU per GetTask on SQLite")]
    [create] = [ok for t, ok in met.items() if t.startswith("CreateTask on SQLite")]
    assert cpu and create  # 1.19 <= 1.2 and 61% >= 60%
    batches = {t.split(" on ")[1].split(",")[0]: ok for t, ok in met.items() if "of 10" in t}
    assert batches == {"sqlite": True, "firestore": False}  # 4.9x and 5.1x against 5x
    [tel] = [ok for t, ok in met.items() if t.startswith("telemetry on")]
    assert not tel  # 1.16x against 1.15x
    assert not any(t.startswith("telemetry on") for t, _, _ in _targets(r))  # no figures, no row

    # ListTasks beside the direct client's same query, and the combined ceiling.
    firestore = r["stores"]["firestore"]
    firestore["list_ceiling"] = {
        n: {**firestore["rpcs"]["ListTasks"][n], "calls_per_s": 2 * row["calls_per_s"]}
        for n, row in firestore["rpcs"]["ListTasks"].items()
    }
    (tmp_path / "telemetry.json").write_text(json.dumps(telemetry))
    write_report(r, tmp_path)
    text = (tmp_path / "benchmarks.md").read_text()
    assert "| telemetry on (OTLP, default sampling)" in text
    [row64] = [line for line in text.splitlines() if line.startswith("| 64 | ")]
    assert "| 50% |" in row64  # ListTasks at half the direct client's rate
    direct = max(
        (r[k]["get"] for k in ("firestore_direct_before", "firestore_direct")),
        key=lambda x: x["calls_per_s"],
    )["calls_per_s"]
    echo = r["echo"][64]["calls_per_s"]
    [get] = [
        line for line in text.splitlines() if line.startswith("| GetTask |") and "| get |" in line
    ]
    assert f"| {1 / (1 / direct + 1 / echo):,.0f} |" in get
