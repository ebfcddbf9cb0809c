"""What tests share beyond harness/: building requests, reading error
details, skipping a whole suite loudly (_calls), and the mixed-callers
workload's ledger and reconciliation (_workload)."""

from tests.helpers._calls import (
    LOUD_SKIPS,
    create_request,
    details_of,
    expect_error,
    json_lines,
    loud_skip,
    stream_of,
)
from tests.helpers._workload import Ledger, Reconciliation, eventually, everything, reconcile

__all__ = [
    "LOUD_SKIPS",
    "Ledger",
    "Reconciliation",
    "create_request",
    "details_of",
    "eventually",
    "everything",
    "expect_error",
    "json_lines",
    "loud_skip",
    "reconcile",
    "stream_of",
]
