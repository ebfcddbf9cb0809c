"""Figures that reliability tests report, for docs/reports/reliability.md.

A test calls record(name, **figures); when TASKSERVICE_RELIABILITY_OUT names a
file, each record is appended there as one JSON line
(scripts/reliability_report.py sets it and renders the table).
"""

from __future__ import annotations

import json
import os
from typing import Any


def record(name: str, **figures: Any) -> None:
    out = os.environ.get("TASKSERVICE_RELIABILITY_OUT")
    line = json.dumps({"test": name, **figures}, sort_keys=True, default=str)
    print(f"\nRELIABILITY {line}")
    if out:
        with open(out, "a") as f:
            f.write(line + "\n")
