"""The package's shape, beside the import contracts lint-imports checks: no
module over 500 lines, and at most 8 modules loose at the top of the package
(the rest live in their layer's package)."""

from __future__ import annotations

from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "taskservice"
MAX_LINES = 500
MAX_LOOSE = 8


def test_no_module_is_over_500_lines() -> None:
    long = {
        p.relative_to(PACKAGE).as_posix(): n
        for p in PACKAGE.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not long, long


def test_few_modules_are_loose_at_the_top() -> None:
    loose = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(loose) <= MAX_LOOSE, loose
