"""The benchmark harness's promises that need no benchmark run: where a run
writes, what its help says, and that it names only files it wrote."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench.__main__ import FULL_MINUTES, QUICK_MINUTES, ROOT, build_parser, output_dir

_WITHOUT_MATPLOTLIB = """
import json, sys
from pathlib import Path
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
