"""Pure parts of the scaling series: ABBA order, sustained rate, efficiency, bounds, tables."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from medmesh_cli.bench.scaling import (
    Trial,
    abba,
    box_cpu_times,
    box_shares,
    busy_share,
    cpu_efficiency,
    efficiency,
    http_capacity,
    partition_bound,
    result_messages,
    scaling_markdown,
    spread,
    sustained_rate,
)
from medmesh_contracts.events import InferenceCompleted


def test_abba_interleaves_both_variants_alike() -> None:
    """ABBA runs each variant as often, first and last alike: 1, 2, 2, 1 per repetition."""
    assert abba(1, 2) == [1, 2, 2, 1]
    assert abba(1, 2, repetitions=2) == [1, 2, 2, 1, 1, 2, 2, 1]


def test_sustained_rate_leaves_out_start_and_tail() -> None:
    """The rate is taken between the 10th and 90th percentile: a slow start and a lone late
    record do not lower it."""
    steady = [1.0 + i * 0.01 for i in range(101)]  # 100 records per second
    assert sustained_rate(steady) == pytest.approx(100.0)
    slowed = [0.0, *steady[1:-1], 30.0]
    assert sustained_rate(slowed) == pytest.approx(100.0)
    # A poll's records sent together: 100 per second all the same, whatever the poll size.
    for size in (50, 200, 250):
        polled = [size / 100 * (i // size) for i in range(1000)]
        assert sustained_rate(polled) == pytest.approx(100.0)
    assert math.isnan(sustained_rate([1.0, 2.0]))
    assert math.isnan(sustained_rate([5.0, 5.0, 5.0]))


def test_spread_is_median_and_range_ignoring_nan() -> None:
    """Median and range of the numbers among the samples; all NaN when there are none."""
    s = spread([3.0, math.nan, 1.0, 2.0])
    assert (s.median, s.low, s.high) == (2.0, 1.0, 3.0)
    assert math.isnan(spread([math.nan]).median)


def test_efficiency_of_medians_with_range() -> None:
    """Efficiency is T(2) / (2 T(1)) of the medians, its range from the extreme pairings."""
    e = efficiency([100.0, 110.0], [180.0, 200.0])
    assert e.median == pytest.approx(190.0 / 210.0)
    assert e.low == pytest.approx(180.0 / 220.0)
    assert e.high == pytest.approx(200.0 / 200.0)
    assert math.isnan(efficiency([], [100.0]).median)
    assert math.isnan(efficiency([0.0], [100.0]).median)


def test_cpu_efficiency_compares_cost_per_event() -> None:
    """A second instance that costs 10 % more CPU per event is 91 % CPU-efficient."""
    assert cpu_efficiency([2.0, 2.2, 1.8], [2.2, 2.2]) == pytest.approx(2.0 / 2.2)
    assert math.isnan(cpu_efficiency([1.0], []))


def test_box_shares_from_proc_stat(tmp_path: Path) -> None:
    """Busy = all but idle and I/O wait; steal apart; the first eight fields of the cpu line."""
    (tmp_path / "stat").write_text("cpu  100 0 50 800 50 0 0 0 7 7\ncpu0 1 2 3 4 5 6 7 8\n")
    before = box_cpu_times(tmp_path)
    assert before == (100, 0, 50, 800, 50, 0, 0, 0)
    after = (160, 0, 70, 900, 50, 0, 0, 20)
    busy, steal = box_shares(before, after)
    assert busy == pytest.approx(100 / 200)
    assert steal == pytest.approx(20 / 200)
    assert math.isnan(box_shares(before, before)[0])


def test_partition_bound_counts_the_busiest_instance() -> None:
    """Three partitions on two instances cap the gain at 75 %; an even split reaches 100 %."""
    assert partition_bound(3, 2) == pytest.approx(0.75)
    assert partition_bound(4, 2) == 1.0
    assert partition_bound(12, 1) == 1.0
    assert partition_bound(1, 2) == 0.5
    with pytest.raises(ValueError, match=">= 1"):
        partition_bound(0, 2)


def test_busy_share_is_cpu_used_per_instance() -> None:
    """200 events/s at 4 ms each on two instances keeps each instance's core 40 % busy."""
    trial = Trial(2, 1000, 0, 0.5, 200.0, 190.0, 4.0, 1.0, 0.0, 0.1, 0.9, 0.0)
    assert busy_share(trial) == pytest.approx(0.4)


def _level(offered: float, answered: float, p99: float, non_2xx: int = 0) -> dict[str, Any]:
    return {
        "offered_per_s": offered,
        "http": {"per_second": answered, "p50_ms": 5.0, "p99_ms": p99},
        "non_2xx": non_2xx,
        "ingest_cpu_ms": 4.0,
        "broker_cpu_ms": 1.0,
    }


def test_http_capacity_is_highest_level_answered_in_full() -> None:
    """A level counts when all answers are 2xx with p99 under the bound (an overload queues)."""
    levels = [_level(50, 47, 20), _level(80, 75, 480), _level(120, 90, 3000)]
    assert http_capacity(levels) == 80
    assert http_capacity([_level(50, 50, 20, non_2xx=1)]) == 0.0


def test_result_messages_are_valid_results_with_their_id() -> None:
    """The reporting stage's backlog: InferenceCompleted, each carrying its correlation id."""
    ((ident, value, key, headers),) = result_messages(1, "t")
    result = InferenceCompleted.model_validate_json(value)
    assert result.correlation_id == ident
    assert dict(headers)["medmesh-correlation-id"] == ident.encode()
    assert key == result.task.request.patient_pseudonym.encode()


def _stage(name: str, one: list[float], two: list[float]) -> dict[str, Any]:
    def ms(value: float) -> dict[str, float]:
        return {"median": value, "low": value, "high": value}

    per = {
        str(n): {
            "sustained_per_s": spread(rates).__dict__,
            "stage_cpu_ms": ms(4.0),
            "broker_cpu_ms": ms(1.5),
            "triton_cpu_ms": ms(0.0),
            "busy_per_instance": ms(0.5),
            "box_busy": ms(0.95),
        }
        for n, rates in ((1, one), (2, two))
    }
    trials = [
        {
            "instances": n,
            "events": 100,
            "missing": 0,
            "publish_s": 0.4,
            "sustained_per_s": r,
            "drain_per_s": r,
            "stage_cpu_ms": 4.0,
            "broker_cpu_ms": 1.5,
            "triton_cpu_ms": 0.0,
            "client_cpu_ms": 0.2,
            "box_busy": 0.95,
            "box_steal": 0.01,
        }
        for n, r in ((1, one[0]), (2, two[0]), (2, two[1]), (1, one[1]))
    ]
    return {
        "stage": name,
        "backlog": 100,
        "per_instances": per,
        "trials": trials,
        "efficiency": efficiency(one, two).__dict__,
        "cpu_efficiency": 0.9,
        "partition_bound": 1.0,
    }


def test_markdown_table_shows_rates_efficiency_and_broker_total() -> None:
    """The section has a row per stage with both rates and the efficiency, every trial, and the
    broker's CPU per pipeline event added over the stages."""
    report = {
        "cores": [0, 1],
        "partitions": 4,
        "repetitions": 1,
        "stages": [_stage("router", [100.0, 120.0], [200.0, 180.0])],
        "ingest_http": {"levels": [_level(50, 50, 20)], "capacity_per_s": 50.0},
        "broker_cpu_ms_per_pipeline_event": 2.0,
    }
    text = scaling_markdown(json.loads(json.dumps(report)))
    assert (
        "| router | 100 | 110 [100-120] | 190 [180-200] | 86% [75%-100%] | 100% | 0.50 / 0.50 "
        "| 95% / 95% | 4.00 / 4.00 | 90% |" in text
    )
    assert text.count("| router | ") == 5  # the summary row and four trials
    assert "about 500 events/s per broker core" in text
    assert "Capacity of one ingest over HTTP" in text
