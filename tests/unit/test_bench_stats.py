"""Benchmark statistics and generated load."""

from __future__ import annotations

import json
import math
from pathlib import Path

from medmesh_cli.bench.pipeline import vitals_events
from medmesh_cli.bench.stats import markdown_table, percentile, summarize

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "fhir" / "vitals-bundle-high.json"


def test_percentiles_use_nearest_rank() -> None:
    """p50 of 1..100 is 50, p99 is 99, p100 is 100; an empty series has no percentile."""
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50
    assert percentile(values, 99) == 99
    assert percentile(values, 100) == 100
    assert math.isnan(percentile([], 50))


def test_summary_rates_and_table_ratios() -> None:
    """Throughput is count over seconds, and the table shows each series against the baseline."""
    base = summarize("raw", [1.0] * 100, 1.0)
    other = summarize("framework", [2.0] * 80, 1.0)
    assert base.per_second == 100
    table = markdown_table([base, other], baseline="raw")
    assert "| framework | 80 | 80.0 |" in table
    assert table.strip().endswith("0.80 |")


def test_generated_events_vary_values_over_the_requested_patients() -> None:
    """The load generator spreads events over N patients and varies the vital values."""
    events = [json.loads(e) for e in vitals_events(json.loads(FIXTURE.read_text()), 3, 9)]
    patients = {
        entry["resource"]["id"]
        for event in events
        for entry in event["entry"]
        if entry["resource"]["resourceType"] == "Patient"
    }
    assert patients == {"bench-0", "bench-1", "bench-2"}
    heart_rates = {
        entry["resource"]["valueQuantity"]["value"]
        for event in events
        for entry in event["entry"]
        if any(c["code"] == "8867-4" for c in entry["resource"].get("code", {}).get("coding", []))
    }
    assert len(heart_rates) > 1
