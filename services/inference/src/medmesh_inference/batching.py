"""Scoring a batch of tasks with retries and splitting; Triton is injected, Kafka is not here.

A transient Triton error retries the whole batch with exponential backoff and jitter. Before any
task is failed or a batch split, the worker asks whether the model version is still ready: if it
is not (Triton down, restarting or unloading the model), ``ModelUnavailable`` is raised and no
task is failed, so the worker can rewind, pause and wait behind its circuit breaker. Otherwise
spent retries fail the tasks as ``retries-exhausted``, and any other error splits the batch in
halves, so one poison request fails alone and its neighbours succeed.

Outputs are read against the version's output kinds (``medmesh_contracts.results``) before
anything is published: a row with NaN, a wrong shape or a band the spec does not know fails as
``invalid-output`` with the reason, and never reaches reporting.

``Linger`` decides how long a batch waits for more tasks before its call (pure: the worker's
loop passes its clock's readings).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

import numpy as np
import numpy.typing as npt
from tenacity import (
    AsyncRetrying,
    retry_if_exception,
    stop_after_attempt,
    wait_random_exponential,
)

from medmesh_contracts.events import (
    InferenceCompleted,
    InferenceFailed,
    Producer,
    RunInference,
)
from medmesh_contracts.modelspec import ModelSpec, VersionSpec
from medmesh_contracts.results import OutputError, read_outputs
from medmesh_inference.imaging import PreparedImage
from medmesh_inference.tensors import (
    Images,
    Rows,
    TaskInputError,
    input_batch,
    input_rows,
    split_outputs,
)
from medmesh_inference.triton import TritonCallError

Infer = Callable[
    [Mapping[str, npt.NDArray[np.generic]]], Awaitable[Mapping[str, npt.NDArray[np.generic]]]
]
Available = Callable[[], Awaitable[bool]]
Outcome = InferenceCompleted | InferenceFailed
FailureKind = Literal["invalid-input", "invalid-output", "retries-exhausted", "model-unavailable"]


class ModelUnavailable(Exception):  # noqa: N818 -- a condition, not an error of the caller
    """Triton (or the PACS an image input comes from) kept failing transiently and the model
    version is not ready: nothing was scored."""


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently a transient failure is retried."""

    max_attempts: int = 4
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 5.0

    def wait(self) -> wait_random_exponential:
        """Full-jitter exponential backoff: before retry n, a pause drawn from 0 to
        ``initial_backoff_s * 2 ** (n - 1)``, capped at ``max_backoff_s``."""
        return wait_random_exponential(multiplier=self.initial_backoff_s, max=self.max_backoff_s)

    def retrying(self) -> AsyncRetrying:
        """Up to ``max_attempts`` calls while Triton answers with a transient error."""
        return AsyncRetrying(
            stop=stop_after_attempt(self.max_attempts),
            wait=self.wait(),
            retry=retry_if_exception(
                lambda exc: isinstance(exc, TritonCallError) and exc.transient
            ),
            reraise=True,
        )


class Linger:
    """How long a batch waits for more tasks once its first poll returned some (pure: the
    worker's loop passes its clock's readings).

    Adaptive (the default): the backlog a fetch finds, over the time since the previous fetch
    ended (the previous batch being served, or the worker idling), gives the rate tasks arrive
    at. The batch waits for more only when that rate fills it within ``linger_s``, and then no
    longer than it takes to fill it: under load, batches are full and every Triton call and
    transaction serves ``max_batch`` tasks. Otherwise it is scored at once, and the tasks that
    arrive meanwhile are the next batch (batches grow with the load on their own, since tasks
    queue while a batch is being served). So a lone task (an idle worker) is never held, nor is
    a trickle that could not fill a batch anyway; before issue 17 each waited ``linger_s``.

    Fixed (``adaptive=False``, the policy before issue 17): every batch short of ``max_batch``
    waits up to ``linger_s``. The loop stops waiting at the first poll that brings nothing
    (``TaskWorker._fetch``); a full batch never waits.
    """

    def __init__(self, linger_s: float, max_batch: int, adaptive: bool = True) -> None:
        self.linger_s = linger_s
        self.max_batch = max_batch
        self.adaptive = adaptive
        # When the previous fetch ended (None: no fetch yet, no rate known).
        self._fetched_until: float | None = None

    def deadline(self, fetched: int, now: float) -> float:
        """The latest time to wait for more tasks, for a batch whose first poll returned
        ``fetched`` tasks at ``now`` (``now`` itself: score at once)."""
        if fetched >= self.max_batch:
            return now
        if not self.adaptive:
            return now + self.linger_s
        if fetched <= 1 or self._fetched_until is None or now <= self._fetched_until:
            return now
        seconds_per_task = (now - self._fetched_until) / fetched
        fill_s = (self.max_batch - fetched) * seconds_per_task
        return now + fill_s if fill_s <= self.linger_s else now

    def remaining(self, batch: int, deadline: float, now: float) -> float:
        """How long the next poll for more may wait (0: score the ``batch`` tasks now)."""
        if batch >= self.max_batch:
            return 0.0
        return max(0.0, deadline - now)

    def fetched(self, now: float) -> None:
        """The fetch of a batch ended at ``now``: what arrives from now on is the next
        backlog."""
        self._fetched_until = now


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
    images: Sequence[Images] | None = None,
) -> list[Outcome]:
    """One outcome per task, in the order of ``tasks``; ModelUnavailable when Triton is away.

    ``available`` is asked once the retries of a transient error are spent (None: never away).
    ``images`` holds each task's prepared images (``image_inputs``), for image tensors.
    """
    outcomes: list[Outcome | None] = [None] * len(tasks)
    # ``infer`` calls the Triton model version of ``identity``: a task whose spec version is served
    # by another one was routed to the wrong worker and is failed, never scored by this model.
    # Spec versions that share this Triton model version are grouped apart (their outputs read
    # differently).
    groups: dict[int, tuple[VersionSpec, list[int], list[Rows]]] = {}
    for i, task in enumerate(tasks):
        try:
            version = spec.version(task.model_version)
        except KeyError as exc:
            outcomes[i] = _failed(task, identity, "invalid-input", str(exc), attempts=0)
            continue
        target = version.triton
        if (target.model, str(target.version)) != (identity.triton_model, identity.triton_version):
            reason = (
                f"version {version.version} is served by Triton {target.model} v{target.version},"
                f" not by this worker's {identity.triton_model} v{identity.triton_version}"
            )
            outcomes[i] = _failed(task, identity, "invalid-input", reason, attempts=0)
            continue
        try:
            rows = input_rows(task, spec, version, images[i] if images is not None else None)
        except TaskInputError as exc:
            outcomes[i] = _failed(task, identity, "invalid-input", str(exc), attempts=0)
            continue
        group = groups.setdefault(version.version, (version, [], []))
        group[1].append(i)
        group[2].append(rows)
    prepared = {t.event_id: images[i] for i, t in enumerate(tasks)} if images is not None else {}
    for version, positions, rows_of in groups.values():
        scored = await _score_rows(
            [tasks[i] for i in positions],
            rows_of,
            _Scoring(spec, version, infer, identity, policy, now, available, prepared),
        )
        for i, outcome in zip(positions, scored, strict=True):
            outcomes[i] = outcome
    return [o for o in outcomes if o is not None]


@dataclass(frozen=True)
class _Scoring:
    """What every (recursive) scoring call of one version's rows shares."""

    spec: ModelSpec
    version: VersionSpec
    infer: Infer
    identity: WorkerIdentity
    policy: RetryPolicy
    now: Callable[[], datetime]
    available: Available | None
    # Prepared images by task event id (their digests go on the results).
    images: Mapping[str, Images]


async def _score_rows(
    tasks: Sequence[RunInference], rows: Sequence[Rows], how: _Scoring
) -> list[Outcome]:
    identity = how.identity
    attempt, started = 0, 0.0
    try:
        async for trying in how.policy.retrying():
            with trying:
                attempt = trying.retry_state.attempt_number
                started = time.perf_counter()
                outputs = await how.infer(input_batch(how.version, rows))
    except TritonCallError as exc:
        # A server going down can also answer with non-transient errors (a stopping python
        # backend): whatever the error, tasks are failed only while the version is ready.
        if how.available is not None and not await how.available():
            raise ModelUnavailable(str(exc)) from exc
        if exc.transient:
            return [_failed(t, identity, "retries-exhausted", str(exc), attempt) for t in tasks]
        if len(tasks) == 1:
            return [_failed(tasks[0], identity, "invalid-input", str(exc), attempt)]
        middle = len(tasks) // 2
        left = await _score_rows(tasks[:middle], rows[:middle], how)
        right = await _score_rows(tasks[middle:], rows[middle:], how)
        return [*left, *right]
    elapsed_ms = (time.perf_counter() - started) * 1000
    try:
        per_row = split_outputs(outputs, len(tasks))
    except ValueError as exc:
        return [_failed(t, identity, "invalid-output", str(exc), attempt) for t in tasks]
    done = how.now()
    return [
        _completed(task, values, how, len(tasks), elapsed_ms, done, attempt)
        for task, values in zip(tasks, per_row, strict=True)
    ]


def _completed(
    task: RunInference,
    values: dict[str, tuple[float, ...]],
    how: _Scoring,
    batch_size: int,
    elapsed_ms: float,
    done: datetime,
    attempts: int,
) -> Outcome:
    """The result of one row, or its failure when its outputs do not fit the version's spec."""
    try:
        read_outputs(how.spec, how.version, values)
    except OutputError as exc:
        return _failed(task, how.identity, "invalid-output", str(exc), attempts)
    digests = {
        name: image.sha256
        for name, image in how.images.get(task.event_id, {}).items()
        if isinstance(image, PreparedImage)
    }
    return InferenceCompleted(
        correlation_id=task.correlation_id,
        producer=how.identity.producer,
        task=task,
        triton_model=how.identity.triton_model,
        triton_version=how.identity.triton_version,
        outputs=values,
        device_kind=how.identity.device_kind,
        batch_size=batch_size,
        inference_ms=elapsed_ms,
        completed_at=done,
        input_digests=digests,
    )


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
