"""Per-model-version figures a worker exposes on /metrics."""

from __future__ import annotations

from datetime import timedelta

from medmesh_contracts.events import InferenceFailed
from medmesh_inference.metrics import VersionMetrics
from medmesh_runtime.metrics import configure_metrics, prometheus_text
from tests.factories import make_completed, make_task


def test_outcomes_batches_and_ages_are_counted_per_version() -> None:
    """Completed and failed requests are counted by outcome, with batch size and request age."""
    configure_metrics("test", "metrics-test")
    completed = make_completed(task=make_task(model_version=7), outputs={"SCORE": [1.0]})
    failed = InferenceFailed(
        correlation_id="f-1",
        producer=completed.producer,
        task=make_task(model_version=7),
        error_kind="invalid-input",
        reason="bad row",
        attempts=1,
    )
    now = completed.task.request.received_at + timedelta(milliseconds=250)
    VersionMetrics("deterioration", 7).record([completed, completed, failed], now)
    text = prometheus_text().decode()
    lines = [line for line in text.splitlines() if 'model_version="7"' in line]
    requests = {
        line.split('outcome="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
        for line in lines
        if line.startswith("medmesh_inference_requests_total")
    }
    assert requests == {"completed": 2.0, "invalid-input": 1.0}
    assert any(line.startswith("medmesh_inference_batch_size") for line in lines)
    age_sum = next(
        line for line in lines if line.startswith("medmesh_inference_request_duration_seconds_sum")
    )
    assert float(age_sum.rsplit(" ", 1)[1]) == 0.75
    # Seconds in buckets made for them: a 250 ms age falls below the 0.5 s bound.
    assert any(
        line.startswith("medmesh_inference_request_duration_seconds_bucket")
        and 'le="0.5"' in line
        and line.endswith(" 3.0")
        for line in lines
    )


def _samples(prefix: str, version: str) -> dict[str, float]:
    text = prometheus_text().decode()
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(prefix) and f'model_version="{version}"' in line
    }


def test_batches_add_up_per_outcome_and_only_completed_ones_time_triton() -> None:
    """Two batches' counts add up per outcome, one batch-size point per batch; a batch that
    completed nothing records no Triton time."""
    configure_metrics("test", "metrics-test")
    completed = make_completed(task=make_task(model_version=8), outputs={"SCORE": [1.0]})
    failed = InferenceFailed(
        correlation_id="f-2",
        producer=completed.producer,
        task=make_task(model_version=8),
        error_kind="retries-exhausted",
        reason="Triton away",
        attempts=4,
    )
    now = completed.task.request.received_at
    metrics = VersionMetrics("deterioration", 8)
    metrics.record([completed] * 5, now)
    metrics.record([failed, failed], now)
    requests = _samples("medmesh_inference_requests_total", "8")
    assert sorted(requests.values()) == [2.0, 5.0]
    assert list(_samples("medmesh_inference_batch_size_count", "8").values()) == [2.0]
    assert list(_samples("medmesh_inference_triton_duration_seconds_count", "8").values()) == [1.0]
    assert list(_samples("medmesh_inference_request_duration_seconds_count", "8").values()) == [7.0]
