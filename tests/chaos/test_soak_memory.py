"""The soak's pure parts: /proc parsing, process trees, growth windows and its events."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

from medmesh_cli.bench.soak import Growth, event_maker, growth, parse_vm_rss_kib
from medmesh_cli.bench.topology import descendants


def test_vm_rss_is_read_in_kib_and_a_zombie_has_none() -> None:
    """VmRSS is read from /proc/<pid>/status; a status without it (a zombie) counts 0."""
    status = "Name:\tjava\nVmPeak:\t 900 kB\nVmRSS:\t  524288 kB\nThreads:\t40\n"
    assert parse_vm_rss_kib(status) == 524288
    assert parse_vm_rss_kib("Name:\tpython\nState:\tZ (zombie)\n") == 0


def test_a_process_tree_includes_grandchildren_and_nothing_else() -> None:
    """Triton's stubs are its children: the tree of a pid holds them, not its siblings."""
    parents = {10: 1, 11: 10, 12: 10, 13: 11, 20: 1, 21: 20}
    assert sorted(descendants(10, parents)) == [10, 11, 12, 13]
    assert descendants(21, parents) == [21]


def test_growth_compares_the_first_window_after_warmup_with_the_last() -> None:
    """Warm-up samples are ignored; 100 MiB then 104 MiB is +4% (within), 110 MiB is +10%."""
    mib = 1024
    samples = [
        (0.0, {"router": 50 * mib, "kafka": 50 * mib}),  # warm-up: ignored
        (10.0, {"router": 100 * mib, "kafka": 100 * mib}),
        (20.0, {"router": 100 * mib, "kafka": 100 * mib}),
        (30.0, {"router": 102 * mib, "kafka": 105 * mib}),
        (40.0, {"router": 104 * mib, "kafka": 110 * mib}),
        (50.0, {"router": 104 * mib, "kafka": 110 * mib}),
    ]
    rows = {r.process: r for r in growth(samples, warmup_s=10.0, window_s=15.0)}
    assert rows["router"] == Growth("router", 100.0, 104.0, 104.0, 4.0)
    assert rows["router"].within_limit
    assert rows["kafka"].growth_pct == 10.0
    assert not rows["kafka"].within_limit


def test_soak_events_repeat_patients_with_new_readings() -> None:
    """Event i is patient i mod N, and its readings move to now in their original order."""
    make = event_maker("soak-test", patients=3)
    first, fourth = json.loads(make(0)), json.loads(make(3))

    def patient(bundle: dict[str, Any]) -> str:
        return next(
            str(e["resource"]["id"])
            for e in bundle["entry"]
            if e["resource"]["resourceType"] == "Patient"
        )

    def times(bundle: dict[str, Any]) -> list[datetime]:
        return [
            datetime.fromisoformat(e["resource"]["effectiveDateTime"])
            for e in bundle["entry"]
            if "effectiveDateTime" in e["resource"]
        ]

    assert patient(first) == patient(fourth) != patient(json.loads(make(1)))
    assert max(times(fourth)) >= max(times(first)) > datetime.now(UTC) - timedelta(minutes=1)
    shifted = sorted(times(first))
    assert shifted[-1] - shifted[0] == timedelta(
        hours=2, minutes=7
    )  # 06:05 to 08:12 in the fixture
