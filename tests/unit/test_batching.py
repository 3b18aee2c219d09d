"""Scoring batches: fan-out of results, retries of transient errors, splitting around poison."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from tenacity import RetryCallState

from medmesh_contracts.events import (
    InferenceCompleted,
    InferenceFailed,
    ModelInput,
    Producer,
    RunInference,
)
from medmesh_contracts.modelspec import load_spec
from medmesh_inference.batching import (
    Linger,
    ModelUnavailable,
    RetryPolicy,
    WorkerIdentity,
    destination,
    score_tasks,
)
from medmesh_inference.triton import TritonCallError
from tests.factories import make_completed, make_request, make_task

SPEC = load_spec(Path(__file__).resolve().parents[2] / "deploy" / "models" / "deterioration.yaml")
IDENTITY = WorkerIdentity(
    Producer(service="inference", instance="t"), "deterioration", "1", "KIND_CPU"
)
NO_WAIT = RetryPolicy(max_attempts=3, initial_backoff_s=0.0)
POISON_HEART_RATE = 999.0


def _now() -> datetime:
    return datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


def _task(correlation_id: str, heart_rate: float = 80.0) -> RunInference:
    request = make_request(correlation_id=correlation_id)
    inputs = tuple(
        i.model_copy(update={"value": heart_rate}) if i.name == "heart_rate" else i
        for i in request.inputs
    )
    return make_task(request=request.model_copy(update={"inputs": inputs}))


class FakeTriton:
    """Scores a batch as 'heart rate x 2' and can fail in scripted ways."""

    def __init__(self, transient_failures: int = 0) -> None:
        self.transient_failures = transient_failures
        self.batch_sizes: list[int] = []

    async def infer(
        self, inputs: Mapping[str, npt.NDArray[np.generic]]
    ) -> Mapping[str, npt.NDArray[np.generic]]:
        batch = inputs["VITALS"].astype(np.float32)
        self.batch_sizes.append(batch.shape[0])
        if self.transient_failures:
            self.transient_failures -= 1
            raise TritonCallError("StatusCode.UNAVAILABLE: restarting", transient=True)
        if (batch[:, 5] == POISON_HEART_RATE).any():
            raise TritonCallError("StatusCode.INVALID_ARGUMENT: bad row", transient=False)
        n = batch.shape[0]
        return {
            "SCORE": (batch[:, 5:6] * 2).astype(np.float32),
            "RISK_BAND": np.zeros((n, 1), dtype=np.int32),
            "CONTRIBUTIONS": np.zeros((n, 7), dtype=np.float32),
        }


async def test_one_result_per_task_in_order_from_one_call() -> None:
    """A batch of three becomes one Triton call and three results, each with its own score."""
    triton = FakeTriton()
    tasks = [_task("a", 60), _task("b", 70), _task("c", 80)]
    outcomes = await score_tasks(tasks, SPEC, triton.infer, IDENTITY, NO_WAIT, _now)
    assert triton.batch_sizes == [3]
    assert [o.correlation_id for o in outcomes] == ["a", "b", "c"]
    assert all(isinstance(o, InferenceCompleted) for o in outcomes)
    assert [o.outputs["SCORE"] for o in outcomes if isinstance(o, InferenceCompleted)] == [
        (120.0,),
        (140.0,),
        (160.0,),
    ]


async def test_transient_errors_are_retried_then_succeed() -> None:
    """Two UNAVAILABLE answers are retried; the third attempt's results are published."""
    triton = FakeTriton(transient_failures=2)
    outcomes = await score_tasks([_task("a")], SPEC, triton.infer, IDENTITY, NO_WAIT, _now)
    assert len(triton.batch_sizes) == 3
    assert isinstance(outcomes[0], InferenceCompleted)


async def test_retries_exhausted_fail_every_task_with_the_reason() -> None:
    """After max_attempts transient errors, each task fails as retries-exhausted."""
    triton = FakeTriton(transient_failures=10)
    outcomes = await score_tasks(
        [_task("a"), _task("b")], SPEC, triton.infer, IDENTITY, NO_WAIT, _now
    )
    assert all(
        isinstance(o, InferenceFailed) and o.error_kind == "retries-exhausted" for o in outcomes
    )
    assert all(isinstance(o, InferenceFailed) and "UNAVAILABLE" in o.reason for o in outcomes)


async def test_a_poison_row_fails_alone_and_its_neighbours_succeed() -> None:
    """A batch with one bad row is split until the bad row fails alone."""
    triton = FakeTriton()
    tasks = [_task("a"), _task("b"), _task("bad", POISON_HEART_RATE), _task("d")]
    outcomes = await score_tasks(tasks, SPEC, triton.infer, IDENTITY, NO_WAIT, _now)
    kinds = {o.correlation_id: type(o).__name__ for o in outcomes}
    assert kinds == {
        "a": "InferenceCompleted",
        "b": "InferenceCompleted",
        "bad": "InferenceFailed",
        "d": "InferenceCompleted",
    }


async def test_inputs_in_the_wrong_unit_fail_without_calling_triton() -> None:
    """A task whose heart rate is not in /min is failed as invalid-input before any call."""
    triton = FakeTriton()
    task = _task("a")
    wrong_unit = tuple(
        ModelInput(name=i.name, value=i.value, unit="Hz") if i.name == "heart_rate" else i
        for i in task.request.inputs
    )
    task = task.model_copy(
        update={"request": task.request.model_copy(update={"inputs": wrong_unit})}
    )
    outcomes = await score_tasks([task], SPEC, triton.infer, IDENTITY, NO_WAIT, _now)
    assert triton.batch_sizes == []
    assert isinstance(outcomes[0], InferenceFailed)
    assert outcomes[0].error_kind == "invalid-input"


def test_backoff_grows_and_is_capped() -> None:
    """Backoff ceilings double per attempt and never exceed the cap."""
    wait = RetryPolicy(max_attempts=10, initial_backoff_s=0.1, max_backoff_s=1.0).wait()

    def pause_before(attempt: int) -> float:
        state = RetryCallState(retry_object=None, fn=None, args=(), kwargs={})  # type: ignore[arg-type]  # the wait reads only the attempt number
        state.attempt_number = attempt
        return wait(state)

    assert all(0 <= pause_before(1) <= 0.1 for _ in range(50))
    assert all(0 <= pause_before(8) <= 1.0 for _ in range(50))
    assert max(pause_before(8) for _ in range(200)) > 0.5  # the ceiling doubled, then capped


async def test_transient_errors_with_the_version_gone_raise_model_unavailable() -> None:
    """Spent retries while Triton says the version is not ready fail nothing: it is unavailable."""
    triton = FakeTriton(transient_failures=10)

    async def not_ready() -> bool:
        return False

    with pytest.raises(ModelUnavailable):
        await score_tasks([_task("a")], SPEC, triton.infer, IDENTITY, NO_WAIT, _now, not_ready)
    assert len(triton.batch_sizes) == NO_WAIT.max_attempts


async def test_a_non_transient_error_while_the_version_is_gone_is_not_a_poison() -> None:
    """A stopping server's odd error does not fail the batch as invalid input when not ready."""
    triton = FakeTriton()

    async def not_ready() -> bool:
        return False

    with pytest.raises(ModelUnavailable):
        await score_tasks(
            [_task("bad", POISON_HEART_RATE), _task("b")],
            SPEC,
            triton.infer,
            IDENTITY,
            NO_WAIT,
            _now,
            not_ready,
        )
    assert triton.batch_sizes == [2]


async def test_a_poison_row_still_fails_alone_while_the_version_is_ready() -> None:
    """With a ready version, splitting around a poison row works as without the check."""
    triton = FakeTriton()

    async def ready() -> bool:
        return True

    tasks = [_task("a"), _task("bad", POISON_HEART_RATE), _task("c")]
    outcomes = await score_tasks(tasks, SPEC, triton.infer, IDENTITY, NO_WAIT, _now, ready)
    assert [type(o).__name__ for o in outcomes] == [
        "InferenceCompleted",
        "InferenceFailed",
        "InferenceCompleted",
    ]


def test_shadow_results_go_to_the_shadow_topic_and_failures_to_failed() -> None:
    """A shadow task's result is routed to shadow-results; stable results and failures as usual."""
    stable = make_completed()
    shadow_task = make_task(reason="shadow")
    shadow = make_completed(task=shadow_task)
    failed = InferenceFailed(
        correlation_id="x",
        producer=IDENTITY.producer,
        task=shadow_task,
        error_kind="invalid-input",
        reason="bad",
        attempts=1,
    )
    assert destination(stable) == "results"
    assert destination(shadow) == "shadow-results"
    assert destination(failed) == "failed"


class NanTriton(FakeTriton):
    """Answers NaN as the score of a row whose heart rate is 0 (a model bug at run time)."""

    async def infer(
        self, inputs: Mapping[str, npt.NDArray[np.generic]]
    ) -> Mapping[str, npt.NDArray[np.generic]]:
        outputs = dict(await super().infer(inputs))
        rows = inputs["VITALS"].astype(np.float32)[:, 5] == 0.0
        outputs["SCORE"] = np.where(rows[:, None], np.nan, outputs["SCORE"]).astype(np.float32)
        return outputs


async def test_a_row_whose_outputs_do_not_fit_the_spec_fails_as_invalid_output() -> None:
    """A NaN score fails that task as invalid-output with the reason; its neighbours succeed."""
    tasks = [_task("a"), _task("b", heart_rate=0.0), _task("c")]
    outcomes = await score_tasks(tasks, SPEC, NanTriton().infer, IDENTITY, NO_WAIT, _now)
    kinds = [type(o).__name__ for o in outcomes]
    assert kinds == ["InferenceCompleted", "InferenceFailed", "InferenceCompleted"]
    failed = outcomes[1]
    assert isinstance(failed, InferenceFailed)
    assert failed.error_kind == "invalid-output"
    assert "SCORE holds a value that is not a finite number" in failed.reason
    assert destination(failed) == "failed"


class WrongShapeTriton(FakeTriton):
    """Answers one row fewer than it was asked (a broken model)."""

    async def infer(
        self, inputs: Mapping[str, npt.NDArray[np.generic]]
    ) -> Mapping[str, npt.NDArray[np.generic]]:
        outputs = await super().infer(inputs)
        return {name: tensor[:-1] for name, tensor in outputs.items()}


async def test_outputs_of_the_wrong_batch_shape_fail_every_task_of_the_batch() -> None:
    """Fewer output rows than tasks: every task fails as invalid-output, nothing crashes."""
    tasks = [_task("a"), _task("b")]
    outcomes = await score_tasks(tasks, SPEC, WrongShapeTriton().infer, IDENTITY, NO_WAIT, _now)
    failures = [o for o in outcomes if isinstance(o, InferenceFailed)]
    assert [f.error_kind for f in failures] == ["invalid-output", "invalid-output"]
    assert "for a batch of 2" in failures[0].reason


async def test_a_task_of_a_version_another_triton_model_serves_is_failed_not_scored() -> None:
    """A v3 task (served by deterioration-gbt) reaching the v1 worker fails; v1's is scored."""
    triton = FakeTriton()
    tasks = [make_task(make_request(correlation_id="v3"), model_version=3), _task("v1")]
    outcomes = await score_tasks(tasks, SPEC, triton.infer, IDENTITY, NO_WAIT, _now)
    failed, completed = outcomes
    assert isinstance(failed, InferenceFailed)
    assert "served by Triton deterioration-gbt v1" in failed.reason
    assert isinstance(completed, InferenceCompleted)
    assert triton.batch_sizes == [1]


class FakeClock:
    """Monotonic seconds that move only when told."""

    def __init__(self) -> None:
        self.now = 100.0

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


def test_adaptive_linger_scores_a_lone_task_at_once() -> None:
    """A poll that found one task (an idle worker) gives no wait at all, first fetch or not."""
    clock, linger = FakeClock(), Linger(linger_s=0.02, max_batch=64)
    assert linger.deadline(1, clock.now) == clock.now
    linger.fetched(clock.now)
    deadline = linger.deadline(1, clock.advance(0.0001))
    assert deadline == clock.now
    assert linger.remaining(1, deadline, clock.now) == 0.0


def test_adaptive_linger_waits_under_load_only_as_long_as_filling_takes() -> None:
    """16 tasks queued in the 4 ms since the last fetch (4 per ms) fill the other 48 places in
    12 ms: the batch waits that long, not the whole 20 ms linger, and no longer."""
    clock, linger = FakeClock(), Linger(linger_s=0.02, max_batch=64)
    linger.fetched(clock.now)
    deadline = linger.deadline(16, clock.advance(0.004))
    assert deadline == pytest.approx(clock.now + 0.012)
    assert linger.remaining(16, deadline, clock.now) == pytest.approx(0.012)
    assert linger.remaining(40, deadline, clock.advance(0.008)) == pytest.approx(0.004)
    assert linger.remaining(60, deadline, clock.advance(0.005)) == 0.0
    assert linger.remaining(60, deadline, clock.advance(1.0)) == 0.0


def test_adaptive_linger_does_not_hold_a_trickle_that_cannot_fill_the_batch() -> None:
    """2 tasks in the 8 ms since the last fetch would take 248 ms to fill 64 places: no wait
    (they are scored now, the next ones queue meanwhile); nor on the first fetch (no rate)."""
    clock, linger = FakeClock(), Linger(linger_s=0.02, max_batch=64)
    assert linger.deadline(5, clock.now) == clock.now
    linger.fetched(clock.now)
    assert linger.deadline(2, clock.advance(0.008)) == clock.now


def test_a_full_batch_never_waits_and_one_filled_while_waiting_stops() -> None:
    """A first poll of max_batch tasks, or a batch that reaches it while waiting, is scored now
    (adaptive or fixed)."""
    clock = FakeClock()
    for adaptive in (True, False):
        linger = Linger(linger_s=0.02, max_batch=8, adaptive=adaptive)
        linger.fetched(clock.now)
        assert linger.deadline(8, clock.advance(0.001)) == clock.now
        deadline = linger.deadline(3, clock.advance(0.001))
        assert deadline > clock.now
        assert linger.remaining(8, deadline, clock.advance(0.001)) == 0.0


def test_fixed_linger_holds_a_lone_task_as_before() -> None:
    """Fixed (the policy before issue 17): even a lone task waits linger_s for company."""
    clock, linger = FakeClock(), Linger(linger_s=0.02, max_batch=64, adaptive=False)
    deadline = linger.deadline(1, clock.now)
    assert deadline == pytest.approx(clock.now + 0.02)
    assert linger.remaining(1, deadline, clock.advance(0.01)) == pytest.approx(0.01)
