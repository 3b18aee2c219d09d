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
        m = meter("medmesh.inference")
        self._outcomes = m.create_counter(
            "medmesh.inference.requests",
            unit="{request}",
            description="Requests scored by this model version, by outcome",
        )
        self._batch = m.create_histogram(
            "medmesh.inference.batch_size", unit="{request}", description="Requests per Triton call"
        )
        self._triton = m.create_histogram(
            "medmesh.inference.triton_duration",
            unit="ms",
            description="Triton call time per batch (retries included)",
        )
        self._age = m.create_histogram(
            "medmesh.inference.request_age",
            unit="ms",
            description="From ingest's receipt of the request to its result",
        )

    def record(self, outcomes: Sequence[Outcome], now: datetime) -> None:
        """Count a batch's outcomes and its timings."""
        if not outcomes:
            return
        self._batch.record(len(outcomes), self._labels)
        timed = False
        for outcome in outcomes:
            if isinstance(outcome, InferenceCompleted):
                kind = "completed"
                if not timed:
                    self._triton.record(outcome.inference_ms, self._labels)
                    timed = True
            else:
                kind = outcome.error_kind
            self._outcomes.add(1, {**self._labels, "outcome": kind})
            age = (now - outcome.task.request.received_at).total_seconds() * 1000
            self._age.record(age, self._labels)
