"""The rollout controller's judgement, the per-version figures it reads, and worker readiness."""

from __future__ import annotations

import functools
from datetime import UTC, datetime, timedelta
from pathlib import Path

from medmesh_contracts.events import InferenceFailed, Producer, WorkerHeartbeat
from medmesh_contracts.lifecycle import (
    ModelDeployment,
    RolloutPolicy,
    VersionFigures,
    advance,
    deploy_version,
    seed_deployment,
)
from medmesh_contracts.modelspec import load_specs
from medmesh_router.analysis import Analysis, headlines, percentile
from medmesh_router.controller import judge
from medmesh_router.readiness import Readiness
from tests.factories import make_completed, make_request, make_task

PRODUCER = Producer(service="test", instance="t-1")
NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
SPECS = load_specs(Path(__file__).resolve().parents[2] / "deploy" / "models")
POLICY = RolloutPolicy(interval_s=10, min_requests=20, max_error_rate=0.1, max_p99_ms=500)


def _at_step(state: str = "canary") -> ModelDeployment:
    seeded = seed_deployment("deterioration", {1: 100}, PRODUCER, NOW, "t")
    deployed = deploy_version(
        seeded,
        2,
        PRODUCER,
        NOW,
        "t",
        state="shadow" if state == "shadow" else "canary",
        policy=POLICY,
    )
    return deployed if state == "shadow" else advance(deployed, PRODUCER, NOW, "t")


def _figures(
    requests: int, failures: int = 0, p99: float = 50.0, **extra: object
) -> VersionFigures:
    return VersionFigures(
        version=2,
        window_s=10,
        requests=requests,
        failures=failures,
        error_rate=failures / requests if requests else 0.0,
        p50_ms=p99 / 2,
        p99_ms=p99,
        **extra,  # type: ignore[arg-type]
    )


def test_a_new_canary_starts_at_the_first_step() -> None:
    """A canary registered at 0 % gets the first step at once."""
    deployed = deploy_version(
        seed_deployment("deterioration", {1: 100}, PRODUCER, NOW, "t"), 2, PRODUCER, NOW, "t"
    )
    verdict = judge(deployed, _figures(0), NOW)
    assert verdict is not None
    assert verdict.action == "step"


def test_high_error_rate_rolls_back_before_the_interval_ends() -> None:
    """25 % errors over 20 requests (limit 10 %) rolls back even one second into the step."""
    verdict = judge(_at_step(), _figures(20, failures=5), NOW + timedelta(seconds=1))
    assert verdict is not None
    assert verdict.action == "rollback"
    assert "error rate 25.0 % > 10.0 %" in verdict.reason


def test_slow_p99_rolls_back() -> None:
    """A p99 of 900 ms over enough requests (limit 500 ms) rolls back."""
    verdict = judge(_at_step(), _figures(30, p99=900), NOW + timedelta(seconds=11))
    assert verdict is not None
    assert verdict.action == "rollback"
    assert "p99" in verdict.reason


def test_a_healthy_step_advances_only_after_the_interval() -> None:
    """Healthy figures wait for the interval, then step from 5 % to 10 %."""
    assert judge(_at_step(), _figures(30), NOW + timedelta(seconds=5)) is None
    verdict = judge(_at_step(), _figures(30), NOW + timedelta(seconds=10))
    assert verdict is not None
    assert (verdict.action, verdict.reason.endswith("to 10 %")) == ("step", True)


def test_too_few_requests_hold() -> None:
    """After the interval with 3 of 20 requests, the controller holds."""
    verdict = judge(_at_step(), _figures(3), NOW + timedelta(seconds=11))
    assert verdict is not None
    assert verdict.action == "hold"
    assert "only 3 of 20 requests" in verdict.reason


def test_the_last_step_promotes() -> None:
    """From the 50 % step, a healthy interval promotes the version to stable."""
    deployment = _at_step()
    for _ in range(3):
        deployment = advance(deployment, PRODUCER, NOW, "t")
    verdict = judge(deployment, _figures(40), NOW + timedelta(seconds=10))
    assert verdict is not None
    assert verdict.action == "promote"


def test_paused_rollouts_are_left_alone() -> None:
    """A paused rollout gets no verdict, whatever its figures."""
    deployment = _at_step()
    paused = deployment.model_copy(
        update={"rollout": deployment.rollout.model_copy(update={"phase": "paused"})}
    )
    assert judge(paused, _figures(50, failures=50), NOW + timedelta(seconds=60)) is None


def test_shadow_disagreement_rolls_back_and_agreement_enters_the_first_step() -> None:
    """In the shadow stage, 50 % agreement over 20 comparisons rolls back; 95 % goes to 5 %."""
    shadow = _at_step("shadow")
    later = NOW + timedelta(seconds=10)
    bad = judge(shadow, _figures(20, shadow_compared=20, shadow_agreement=0.5), later)
    good = judge(shadow, _figures(20, shadow_compared=20, shadow_agreement=0.95), later)
    assert bad is not None
    assert good is not None
    assert bad.action == "rollback"
    assert (good.action, good.reason.endswith("to 5 %")) == ("step", True)


def test_figures_count_results_failures_and_latency_per_version() -> None:
    """Two results and one failure of v1 give 3 requests, 1/3 errors and p99 from the results."""
    analysis = Analysis(headlines(SPECS))
    task = make_task()
    analysis.completed(make_completed(task))
    analysis.completed(make_completed(task))
    analysis.failed(
        InferenceFailed(
            correlation_id=task.correlation_id,
            producer=PRODUCER,
            occurred_at=task.routed_at + timedelta(milliseconds=30),
            task=task,
            error_kind="retries-exhausted",
            reason="test",
            attempts=4,
        )
    )
    figures = analysis.figures("deterioration", 1, task.routed_at, task.routed_at + timedelta(1))
    assert (figures.requests, figures.failures) == (3, 1)
    assert abs(figures.error_rate - 1 / 3) < 1e-9
    assert figures.p99_ms is not None
    assert abs(figures.p99_ms - 10.0) < 1e-6  # make_completed finishes 10 ms after routing
    assert percentile([5, 1, 3, 2, 4], 0.5) == 3


def test_shadow_agreement_on_a_constructed_case() -> None:
    """Of 4 mirrored requests, 3 share stable's band: agreement 75 %, mean |diff| as computed."""
    analysis = Analysis(headlines(SPECS))
    cases = [((7.0, 3.0), (6.0, 3.0)), ((2.0, 0.0), (2.5, 0.0)), ((5, 2), (5, 2)), ((1, 0), (4, 2))]
    for i, ((s1, b1), (s2, b2)) in enumerate(cases):
        request = make_request(correlation_id=f"c{i}")
        primary = make_task(request, model_version=1)
        mirror = make_task(request, model_version=2, reason="shadow")
        outputs = {"CONTRIBUTIONS": (0.0,)}
        analysis.completed(
            make_completed(mirror, outputs={"SCORE": (s2,), "RISK_BAND": (b2,), **outputs})
        )
        analysis.completed(
            make_completed(primary, outputs={"SCORE": (s1,), "RISK_BAND": (b1,), **outputs})
        )
    start = make_task().routed_at
    figures = analysis.figures("deterioration", 2, start, start + timedelta(1))
    assert figures.shadow_compared == 4
    assert figures.shadow_agreement == 0.75
    assert figures.shadow_mean_abs_diff is not None
    assert abs(figures.shadow_mean_abs_diff - (1.0 + 0.5 + 0.0 + 3.0) / 4) < 1e-9


def _beat(version: int, sent_at: datetime, state: str = "ready") -> WorkerHeartbeat:
    return WorkerHeartbeat(
        correlation_id="hb",
        producer=PRODUCER,
        model="deterioration",
        model_version=version,
        instance=f"w-v{version}",
        state=state,  # type: ignore[arg-type]
        triton_ready=True,
        interval_s=2.0,
        sent_at=sent_at,
    )


def test_readiness_follows_heartbeats_and_trusts_unseen_versions() -> None:
    """Unseen versions may serve; a ready beat is live for 3 intervals; 'stopping' is not ready."""
    readiness = Readiness()
    assert readiness.servable("deterioration", 2, NOW)
    readiness.observe(_beat(2, NOW))
    assert readiness.servable("deterioration", 2, NOW + timedelta(seconds=5))
    assert not readiness.servable("deterioration", 2, NOW + timedelta(seconds=7))
    readiness.observe(_beat(2, NOW + timedelta(seconds=8), state="stopping"))
    assert not readiness.servable("deterioration", 2, NOW + timedelta(seconds=8))
    assert not Readiness(require_heartbeats=True).servable("deterioration", 1, NOW)


def _always(answer: bool, _model: str) -> bool:
    return answer


def test_primary_results_wait_for_a_shadow_only_while_the_model_has_one() -> None:
    """A primary result first: paired with its later shadow result when the model is mirrored;
    without a shadow version it is not kept (unpaired results grew the router's memory)."""
    outputs = {"SCORE": (3.0,), "RISK_BAND": (1.0,), "CONTRIBUTIONS": (0.0,)}
    start = make_task().routed_at
    for mirrored, compared in ((True, 1), (False, 0)):
        analysis = Analysis(headlines(SPECS), mirrored=functools.partial(_always, mirrored))
        request = make_request(correlation_id="c-pair")
        analysis.completed(make_completed(make_task(request), outputs=outputs))
        mirror = make_task(request, model_version=2, reason="shadow")
        analysis.completed(make_completed(mirror, outputs=outputs))
        figures = analysis.figures("deterioration", 2, start, start + timedelta(1))
        assert figures.shadow_compared == compared
