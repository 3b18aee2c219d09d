"""Every histogram in seconds is bucketed for seconds, faststream's included."""

from __future__ import annotations

from medmesh_runtime.metrics import configure_metrics, meter, prometheus_text


def test_a_histogram_in_seconds_gets_second_buckets() -> None:
    """A 0.2 s point of a seconds histogram (as faststream's messaging.process.duration) falls
    in the 0.25 s bucket, not in the first of the SDK's millisecond boundaries."""
    configure_metrics("test", "runtime-metrics-test")
    histogram = meter("test.seconds").create_histogram("test.seconds.duration", unit="s")
    histogram.record(0.2, {"case": "buckets"})
    lines = [
        line
        for line in prometheus_text().decode().splitlines()
        if line.startswith("test_seconds_duration_seconds_bucket") and 'case="buckets"' in line
    ]
    counts = {line.split('le="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1]) for line in lines}
    assert counts["0.1"] == 0.0
    assert counts["0.25"] == 1.0
    assert "5000.0" not in counts
