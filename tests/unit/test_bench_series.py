"""Pure logic of the benchmark series: selection, ratios, Triton statistics, CPU, payloads."""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import pytest

from medmesh_cli.bench.batching import triton_times
from medmesh_cli.bench.common import (
    bench_task,
    burst_summary,
    cpu_seconds_from_stat,
    header_value,
    ratio,
    ratios_markdown,
    with_count,
)
from medmesh_cli.bench.ingest import ingest_markdown, subject_of
from medmesh_cli.bench.series import ALL_SERIES, parse_series
from medmesh_cli.bench.stats import summarize
from medmesh_contracts.events import RunInference


def test_parse_series_defaults_to_all_in_run_order() -> None:
    """An empty list or "all" selects every series, in run order."""
    assert parse_series("") == list(ALL_SERIES)
    assert parse_series("all") == list(ALL_SERIES)
    assert parse_series("tracing, hop") == ["hop", "tracing"]


def test_parse_series_rejects_unknown_names() -> None:
    """An unknown series name is an error that lists the known ones."""
    with pytest.raises(ValueError, match="batching"):
        parse_series("hop,nope")


def test_ratio_against_target() -> None:
    """A ratio is met at or above its target, never when it cannot be computed."""
    assert ratio("x", 80, 100, 0.8).met
    assert not ratio("x", 79, 100, 0.8).met
    assert math.isnan(ratio("x", 1, 0, 0.8).value)
    assert not ratio("x", 1, 0, 0.8).met


def test_ratios_markdown_uses_percent_or_times() -> None:
    """Fractional targets print as percentages, multiples as "x"."""
    text = ratios_markdown([ratio("b / a", 9, 10, 0.8), ratio("b / c", 12, 2, 5)])
    assert "| b / a | 90% | >= 80% | yes |" in text
    assert "| b / c | 6.00x | >= 5x | yes |" in text


def test_triton_times_are_deltas_per_request() -> None:
    """Counts (strings or ints) and nanoseconds become deltas and per-request means."""

    def stats(rows: int, execs: int, requests: int, queue_ns: int, compute_ns: int) -> Any:
        return {
            "model_stats": [
                {"name": "other", "version": "1", "inference_count": "999"},
                {
                    "name": "deterioration",
                    "version": "1",
                    "inference_count": str(rows),
                    "execution_count": execs,
                    "inference_stats": {
                        "success": {"count": str(requests)},
                        "queue": {"ns": str(queue_ns)},
                        "compute_infer": {"ns": str(compute_ns)},
                    },
                },
            ]
        }

    times = triton_times(
        stats(100, 10, 10, 1_000_000, 5_000_000),
        stats(740, 20, 20, 3_000_000, 25_000_000),
        "deterioration",
        "1",
    )
    assert (times.requests, times.executions) == (10, 10)
    assert times.rows_per_execution == 64.0
    assert times.queue_us == 200.0
    assert times.compute_us == 2000.0


def test_triton_times_without_the_model_are_zero() -> None:
    """A model missing from the statistics gives zeros, not an error."""
    times = triton_times({}, {"model_stats": []}, "deterioration", "1")
    assert times.requests == 0
    assert times.queue_us == 0.0


def test_cpu_seconds_from_stat_handles_spaces_in_the_name() -> None:
    """utime + stime are read after the command name, whatever it contains."""
    stat = "1234 (python -m x) S 1 2 3 4 5 6 7 8 9 10 150 50 0 0 20 0 1 0"
    assert cpu_seconds_from_stat(stat, ticks_per_s=100) == 2.0


def test_burst_summary_spans_first_send_to_last_arrival() -> None:
    """Throughput counts arrivals over first send to last arrival; latency per message."""
    summary = burst_summary("x", {"a": 0.0, "b": 0.5, "c": 0.6}, {"a": 1.0, "b": 2.0})
    assert summary.count == 2
    assert summary.per_second == 1.0
    assert summary.max_ms == 1500.0


def test_with_count_rescales_throughput() -> None:
    """Counting rows instead of calls scales the rate, not the latencies."""
    summary = with_count(summarize("x", [1.0, 2.0], 2.0), 128)
    assert summary.per_second == 64.0
    assert summary.p50_ms == 1.0


def test_bench_task_is_a_valid_unique_run_inference() -> None:
    """Bench tasks round-trip through the contract and differ by correlation id."""
    first, second = bench_task(0, "r"), bench_task(1, "r")
    assert RunInference.model_validate_json(first.model_dump_json(by_alias=True)) == first
    assert first.correlation_id != second.correlation_id
    assert first.request.inputs[0].name == "respiratory_rate"


def test_record_helpers_read_headers_and_subjects() -> None:
    """Headers are read as text; a subject comes only from a JSON object."""
    record = SimpleNamespace(headers=[("a", b"1")], value=b'{"subject_reference": "Patient/x"}')
    assert header_value(record, "a") == "1"
    assert header_value(record, "b") is None
    assert subject_of(record) == "Patient/x"
    assert subject_of(SimpleNamespace(value=b"[1]")) is None
    assert subject_of(SimpleNamespace(value=b"not json")) is None


def test_ingest_markdown_shows_the_in_process_logic_split() -> None:
    """The ingest section names validation alone and ingest's logic without Kafka, per event."""
    report = {
        "series": [
            {
                "name": "plain loop",
                "count": 10,
                "seconds": 0.1,
                "per_second": 100.0,
                "p50_ms": 1.0,
                "p90_ms": 2.0,
                "p99_ms": 3.0,
                "max_ms": 4.0,
            },
            {
                "name": "ingest",
                "count": 10,
                "seconds": 0.2,
                "per_second": 50.0,
                "p50_ms": 1.0,
                "p90_ms": 2.0,
                "p99_ms": 3.0,
                "max_ms": 4.0,
            },
        ],
        "cpu_ms_per_event": {"plain loop": 2.0, "ingest": 4.0},
        "logic_cpu_ms_per_event": {
            "fhir.resources validation alone": 1.25,
            "ingest logic without Kafka": 2.5,
        },
        "missing": {"plain loop": 0, "ingest": 0},
        "ratios": [{"name": "ingest / plain loop", "value": 0.5, "target": 0.7}],
    }
    text = ingest_markdown(report)
    assert "fhir.resources validation alone: 1.25 ms, ingest logic without Kafka: 2.50 ms" in text
    assert "| ingest / plain loop | 50% | >= 70% | no |" in text
