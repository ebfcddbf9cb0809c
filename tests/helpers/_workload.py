"""The mixed-callers workload's bookkeeping: what callers were told (Ledger),
what the store holds afterwards (everything), and how the two must agree
(reconcile); plus waiting for a condition (eventually)."""

from __future__ import annotations

import asyncio
from collections import Counter, defaultdict
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any, TypeVar

from tasks.v1 import task_service_pb2 as pb

T = TypeVar("T")


@dataclass
class Ledger:
    """What the callers were told, to reconcile with the store afterwards.
    A created task's description is the request_id it was created with."""

    codes: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    attempted_request_ids: set[str] = field(default_factory=set)
    acked: dict[str, str] = field(default_factory=dict)  # name -> request_id
    deleted: set[str] = field(default_factory=set)
    titles: dict[str, str] = field(default_factory=dict)  # last acknowledged title
    # Titles an update may or may not have written (its outcome unknown).
    uncertain_titles: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    etag_winners: Counter[str] = field(default_factory=Counter)
    retries: int = 0
    # Across instances (tests/test_scaleout.py).
    request_id_disagreements: int = 0
    cross_instance_retries: int = 0
    listings: int = 0
    bad_listings: list[str] = field(default_factory=list)
    gave_up: list[str] = field(default_factory=list)
    ops: Counter[str] = field(default_factory=Counter)
    # Failures other than the expected ones, as the caller saw them (the
    # first few, to say in the assertion what went wrong).
    surprises: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Reconciliation:
    """Where the store disagrees with what its callers were told."""

    lost: list[str]  # acknowledged creates missing, or acknowledged deletes undone
    phantoms: list[str]  # tasks no caller asked for
    duplicates: list[str]  # request_ids that created more than one task
    stale: list[str]  # tasks whose title is not the last acknowledged one
    double_winners: list[str]  # etags two updates both won

    def figures(self) -> dict[str, int]:
        return {
            "lost_writes": len(self.lost),
            "phantom_writes": len(self.phantoms),
            "duplicate_request_ids": len(self.duplicates),
            "lost_updates": len(self.stale),
            "etags_with_two_winners": len(self.double_winners),
        }

    def assert_none(self) -> None:
        assert not self.lost, self.lost[:5]
        assert not self.phantoms, self.phantoms[:5]
        assert not self.duplicates, self.duplicates[:5]
        assert not self.stale, self.stale[:5]
        assert not self.double_winners, self.double_winners[:5]


def reconcile(
    ledger: Ledger, stored: dict[str, pb.Task], not_the_callers: Collection[str] = ()
) -> Reconciliation:
    """The store's tasks (by name) against the ledger, leaving out the tasks
    the test made itself (hot documents, reference tasks)."""
    own = {n: t for n, t in stored.items() if n not in not_the_callers}
    lost = [n for n in ledger.acked if n not in ledger.deleted and n not in own]
    lost += [n for n in ledger.deleted if n in own]  # an acknowledged delete undone
    return Reconciliation(
        lost=lost,
        phantoms=[n for n, t in own.items() if t.description not in ledger.attempted_request_ids],
        duplicates=[
            r for r, count in Counter(t.description for t in own.values()).items() if count > 1
        ],
        stale=[
            n
            for n, t in own.items()
            if n in ledger.titles
            and t.title != ledger.titles[n]
            and t.title not in ledger.uncertain_titles.get(n, set())
        ],
        double_winners=[e for e, count in ledger.etag_winners.items() if count > 1],
    )


async def everything(stub: Any) -> list[pb.Task]:
    """Every task in the store, page by page."""
    tasks: list[pb.Task] = []
    token = ""
    while True:
        page = await stub.ListTasks(
            pb.ListTasksRequest(page_size=200, page_token=token), timeout=30
        )
        tasks.extend(page.tasks)
        token = page.next_page_token
        if not token:
            return tasks


async def eventually(probe: Callable[[], T], *, timeout: float = 2.0, interval: float = 0.01) -> T:
    """probe()'s first truthy value, polled every `interval` s; its last value
    when `timeout` passes first (the caller's assertion then says what)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = probe()
        if value or loop.time() >= deadline:
            return value
        await asyncio.sleep(interval)
