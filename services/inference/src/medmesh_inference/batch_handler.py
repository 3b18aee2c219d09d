"""Scoring one batch of tasks on Triton, each outcome made in its task's own trace.

``BatchHandler.handle`` is what ``worker.TaskWorker`` calls per fetched batch: one Triton call
(``batching.score_tasks``: retries, poison splitting), the version's metrics, and each task's
outcome record (``outcomes.traced_outcomes``) for the loop to produce in the transaction of the
task's offset. It produces nothing itself.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

from opentelemetry import trace

from medmesh_contracts.events import InferenceCompleted, RunInference, utc_now
from medmesh_contracts.modelspec import ModelSpec, VersionSpec
from medmesh_inference.batching import RetryPolicy, WorkerIdentity, score_tasks
from medmesh_inference.image_inputs import ImageInputs, prepare_in_span
from medmesh_inference.metrics import VersionMetrics
from medmesh_inference.outcomes import traced_outcomes
from medmesh_inference.triton import TritonModel
from medmesh_inference.worker import Scored
from medmesh_runtime.logging import get_logger

log = get_logger("medmesh.inference")


class BatchHandler:
    """Scores a batch on Triton; makes each task's outcome record in the task's own trace."""

    def __init__(
        self,
        spec: ModelSpec,
        version: VersionSpec,
        triton: TritonModel,
        identity: WorkerIdentity,
        policy: RetryPolicy,
        tracer: trace.Tracer,
        images: ImageInputs | None = None,
    ) -> None:
        self.spec = spec
        # Fetches and prepares image inputs (None: the model reads no image).
        self.images = images
        self.version = version
        self.triton = triton
        self.identity = identity
        self.policy = policy
        self.tracer = tracer
        self.metrics = VersionMetrics(spec.name, version.version)

    async def refresh_device_kind(self) -> None:
        """The version is (again) ready: learn the device kind Triton runs it on."""
        try:
            kind = await self.triton.device_kind()
        except Exception as exc:  # noqa: BLE001 -- keep the last known kind; scoring is unaffected
            log.warning("device kind unknown", error=f"{type(exc).__name__}: {exc}")
            return
        if kind != self.identity.device_kind:
            self.identity = dataclasses.replace(self.identity, device_kind=kind)
            log.info(
                "triton ready",
                model=self.version.triton.model,
                model_version=self.version.triton.version,
                device_kind=kind,
            )

    async def handle(self, tasks: Sequence[RunInference], sources: Sequence[Any]) -> list[Scored]:
        """Score ``tasks`` in one batch; one outcome and its record (to produce in the
        transaction of the task's offset) per task. Produces nothing itself."""
        received_ns = time.time_ns()
        with self.tracer.start_as_current_span(
            "inference.batch",
            attributes={
                "medmesh.batch_size": len(tasks),
                "medmesh.model": self.spec.name,
                "medmesh.model_version": self.version.version,
            },
        ) as batch_span:
            prepared = await prepare_in_span(self.images, tasks, self.tracer)
            outcomes = await score_tasks(
                tasks,
                self.spec,
                self.triton.infer,
                self.identity,
                self.policy,
                utc_now,
                self.triton.ready,
                prepared,
            )
        self.metrics.record(outcomes, utc_now())
        scored = traced_outcomes(
            self.tracer, outcomes, sources, batch_span=batch_span, received_ns=received_ns
        )
        log.info(
            "batch scored",
            batch_size=len(tasks),
            failed=sum(not isinstance(o, InferenceCompleted) for o in outcomes),
            model=self.spec.name,
            model_version=self.version.version,
        )
        return scored
