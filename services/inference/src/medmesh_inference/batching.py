"""Scoring a batch of tasks with retries and splitting; Triton is injected, Kafka is not here.

A transient Triton error retries the whole batch with exponential backoff and jitter. Before any
task is failed or a batch split, the worker asks whether the model version is still ready: if it
is not (Triton down, restarting or unloading the model), ``ModelUnavailable`` is raised and no
task is failed, so the worker can rewind, pause and wait behind its circuit breaker. Otherwise
spent retries fail the tasks as ``retries-exhausted``, and any other error splits the batch in
halves, so one poison request fails alone and its neighbours succeed.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

import numpy as np
import numpy.typing as npt

from medmesh_contracts.events import (
    InferenceCompleted,
    InferenceFailed,
    Producer,
    RunInference,
)
from medmesh_contracts.modelspec import ModelSpec
from medmesh_inference.tensors import TaskInputError, input_batch, input_row, split_outputs
from medmesh_inference.triton import TritonCallError

Infer = Callable[[npt.NDArray[np.float32]], Awaitable[Mapping[str, npt.NDArray[np.generic]]]]
Available = Callable[[], Awaitable[bool]]
Outcome = InferenceCompleted | InferenceFailed
FailureKind = Literal["invalid-input", "retries-exhausted", "model-unavailable"]


class ModelUnavailable(Exception):  # noqa: N818 -- a condition, not an error of the caller
    """Triton kept failing transiently and the model version is not ready: nothing was scored."""


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently a transient failure is retried."""

    max_attempts: int = 4
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 5.0

    def backoff(self, attempt: int) -> float:
        """Full-jitter exponential backoff before retry number ``attempt`` (1-based)."""
        ceiling = min(self.max_backoff_s, self.initial_backoff_s * 2 ** (attempt - 1))
        return random.uniform(0, ceiling)  # noqa: S311 -- jitter, not cryptography


@dataclass(frozen=True)
class WorkerIdentity:
    """What a worker stamps on its events."""

    producer: Producer
    triton_model: str
    triton_version: str
    device_kind: str


async def score_tasks(
    tasks: Sequence[RunInference],
    spec: ModelSpec,
    infer: Infer,
    identity: WorkerIdentity,
    policy: RetryPolicy,
    now: Callable[[], datetime],
    available: Available | None = None,
) -> list[Outcome]:
    """One outcome per task, in the order of ``tasks``; ModelUnavailable when Triton is away.

    ``available`` is asked once the retries of a transient error are spent (None: never away).
    """
    outcomes: list[Outcome | None] = [None] * len(tasks)
    rows: list[list[float]] = []
    positions: list[int] = []
    for i, task in enumerate(tasks):
        try:
            rows.append(input_row(task, spec))
            positions.append(i)
        except TaskInputError as exc:
            outcomes[i] = _failed(task, identity, "invalid-input", str(exc), attempts=0)
    if rows:
        scored = await _score_rows(
            [tasks[i] for i in positions], rows, spec, infer, identity, policy, now, available
        )
        for i, outcome in zip(positions, scored, strict=True):
            outcomes[i] = outcome
    return [o for o in outcomes if o is not None]


async def _score_rows(
    tasks: Sequence[RunInference],
    rows: Sequence[list[float]],
    spec: ModelSpec,
    infer: Infer,
    identity: WorkerIdentity,
    policy: RetryPolicy,
    now: Callable[[], datetime],
    available: Available | None,
) -> list[Outcome]:
    attempt = 0
    while True:
        attempt += 1
        started = time.perf_counter()
        try:
            outputs = await infer(input_batch(rows))
        except TritonCallError as exc:
            if exc.transient and attempt < policy.max_attempts:
                await asyncio.sleep(policy.backoff(attempt))
                continue
            # A server going down can also answer with non-transient errors (a stopping python
            # backend): whatever the error, tasks are failed only while the version is ready.
            if available is not None and not await available():
                raise ModelUnavailable(str(exc)) from exc
            if exc.transient:
                return [_failed(t, identity, "retries-exhausted", str(exc), attempt) for t in tasks]
            if len(tasks) == 1:
                return [_failed(tasks[0], identity, "invalid-input", str(exc), attempt)]
            middle = len(tasks) // 2
            left = await _score_rows(
                tasks[:middle], rows[:middle], spec, infer, identity, policy, now, available
            )
            right = await _score_rows(
                tasks[middle:], rows[middle:], spec, infer, identity, policy, now, available
            )
            return [*left, *right]
        elapsed_ms = (time.perf_counter() - started) * 1000
        per_row = split_outputs(outputs, len(tasks))
        done = now()
        return [
            InferenceCompleted(
                correlation_id=task.correlation_id,
                producer=identity.producer,
                task=task,
                triton_model=identity.triton_model,
                triton_version=identity.triton_version,
                outputs=values,
                device_kind=identity.device_kind,
                batch_size=len(tasks),
                inference_ms=elapsed_ms,
                completed_at=done,
            )
            for task, values in zip(tasks, per_row, strict=True)
        ]


def _failed(
    task: RunInference, identity: WorkerIdentity, kind: FailureKind, reason: str, attempts: int
) -> InferenceFailed:
    return InferenceFailed(
        correlation_id=task.correlation_id,
        producer=identity.producer,
        task=task,
        error_kind=kind,
        reason=reason,
        attempts=attempts,
    )


def destination(outcome: Outcome) -> Literal["results", "shadow-results", "failed"]:
    """Where an outcome goes: a shadow version's results never reach reporting."""
    if isinstance(outcome, InferenceFailed):
        return "failed"
    return "shadow-results" if outcome.task.route.reason == "shadow" else "results"
