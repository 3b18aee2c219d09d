"""Per-model-version figures on /metrics: what ops and the rollout watch for canary health."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from medmesh_contracts.events import InferenceCompleted
from medmesh_inference.batching import Outcome
from medmesh_runtime.metrics import meter


class VersionMetrics:
    """Requests, failures, batch sizes, Triton time and request age for one model version."""

    def __init__(self, model: str, version: int) -> None:
        self._labels = {"model": model, "model_version": str(version)}
        self._by_outcome: dict[str, dict[str, str]] = {}
        m = meter("medmesh.inference")
        self._outcomes = m.create_counter(
            "medmesh.inference.requests",
            unit="{request}",
            description="Requests scored by this model version, by outcome",
        )
        self._batch = m.create_histogram(
            "medmesh.inference.batch_size", unit="{request}", description="Requests per Triton call"
        )
        # Durations in seconds (OpenTelemetry's base unit; medmesh_runtime.metrics buckets them).
        self._triton = m.create_histogram(
            "medmesh.inference.triton.duration",
            unit="s",
            description="Triton call time per batch (retries included)",
        )
        self._age = m.create_histogram(
            "medmesh.inference.request.duration",
            unit="s",
            description="From ingest's receipt of the request to its result",
        )

    def record(self, outcomes: Sequence[Outcome], now: datetime) -> None:
        """Count a batch's outcomes and its timings: one point per batch for the batch size,
        the Triton time and each outcome kind's count (``add(n)``); the request age stays one
        point per request (a histogram of requests' ages)."""
        if not outcomes:
            return
        labels = self._labels
        self._batch.record(len(outcomes), labels)
        kinds: dict[str, int] = {}
        triton_s: float | None = None
        for outcome in outcomes:
            if isinstance(outcome, InferenceCompleted):
                kind = "completed"
                if triton_s is None:
                    triton_s = outcome.inference_ms / 1000
            else:
                kind = outcome.error_kind
            kinds[kind] = kinds.get(kind, 0) + 1
            self._age.record((now - outcome.task.request.received_at).total_seconds(), labels)
        if triton_s is not None:
            self._triton.record(triton_s, labels)
        for kind, count in kinds.items():
            self._outcomes.add(count, self._outcome_labels(kind))

    def _outcome_labels(self, kind: str) -> dict[str, str]:
        labels = self._by_outcome.get(kind)
        if labels is None:
            labels = self._by_outcome[kind] = {**self._labels, "outcome": kind}
        return labels
