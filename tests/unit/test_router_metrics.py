"""The router's figures on /metrics: tasks by version and reason, weights, rollout steps."""

from __future__ import annotations

from datetime import timedelta
from typing import Literal

from medmesh_contracts.events import Producer, RouteDecision, WorkerHeartbeat, utc_now
from medmesh_contracts.lifecycle import deploy_version, seed_deployment
from medmesh_contracts.modelspec import load_spec
from medmesh_router.metrics import RouterMetrics
from medmesh_router.readiness import Readiness
from medmesh_router.routing import RoutedWire
from medmesh_router.state import RouterState
from medmesh_runtime.metrics import configure_metrics, prometheus_text
from tests.service.conftest import SPECS_DIR

SPEC = load_spec(SPECS_DIR / "deterioration.yaml")
PRODUCER = Producer(service="router", instance="metrics-test")


def _sample(text: str, name: str, **labels: str) -> float | None:
    """The value of the sample ``name`` whose labels include ``labels`` (None: none)."""
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


def _task(version: int, reason: Literal["bucket", "rule", "shadow"]) -> RoutedWire:
    return RoutedWire("topic", b"", version, RouteDecision(reason=reason))


def test_tasks_are_counted_per_poll_by_model_version_and_reason() -> None:
    """A poll's tasks add up per (model, version, reason): primaries and shadow copies apart."""
    configure_metrics("test", "router-metrics-test")
    metrics = RouterMetrics(RouterState({}, Readiness()))
    metrics.routed(
        [
            ("counted-model", [_task(1, "bucket"), _task(2, "shadow")]),
            ("counted-model", [_task(1, "bucket")]),
            ("counted-model", [_task(2, "rule")]),
        ]
    )
    text = prometheus_text().decode()
    tasks = "medmesh_router_tasks_total"
    assert _sample(text, tasks, model="counted-model", model_version="1", reason="bucket") == 2.0
    assert _sample(text, tasks, model="counted-model", model_version="2", reason="shadow") == 1.0
    assert _sample(text, tasks, model="counted-model", model_version="2", reason="rule") == 1.0


def test_weights_and_the_rollout_step_are_read_from_the_state() -> None:
    """The weight gauge shows each version's effective share and the step gauge the rollout's
    step and phase, as the router's state holds them when scraped."""
    configure_metrics("test", "router-metrics-test")
    state = RouterState({SPEC.name: SPEC}, Readiness(require_heartbeats=False))
    metrics = RouterMetrics(state)
    now = utc_now()
    state.apply(seed_deployment(SPEC.name, {1: 100}, PRODUCER, now, "t"), now)
    text = prometheus_text().decode()
    assert _sample(text, "medmesh_router_weight_percent", model=SPEC.name, model_version="1") == (
        100.0
    )
    assert _sample(text, "medmesh_router_rollout_step", model=SPEC.name, phase="idle") == -1.0
    state.apply(deploy_version(state.deployments[SPEC.name], 2, PRODUCER, now, "t"), now)
    metrics.evaluated(SPEC.name, "pending")
    text = prometheus_text().decode()
    step = _sample(text, "medmesh_router_rollout_step", model=SPEC.name, model_version="2")
    assert step is not None
    evaluations = "medmesh_router_rollout_evaluations_total"
    assert _sample(text, evaluations, model=SPEC.name, verdict="pending") == 1.0


def test_live_workers_are_shown_for_versions_that_ever_sent_a_heartbeat() -> None:
    """A version with a ready worker's recent heartbeat shows 1; one never heard from shows
    nothing (its workers may send none); once its only worker says it is stopping, 0."""
    configure_metrics("test", "router-metrics-test")
    state = RouterState({SPEC.name: SPEC}, Readiness())
    RouterMetrics(state)
    now = utc_now()
    state.apply(seed_deployment(SPEC.name, {1: 100}, PRODUCER, now, "t"), now)
    state.apply(deploy_version(state.deployments[SPEC.name], 2, PRODUCER, now, "t"), now)
    beat = WorkerHeartbeat(
        correlation_id="hb",
        producer=PRODUCER,
        model=SPEC.name,
        model_version=1,
        instance="w-1",
        state="ready",
        triton_ready=True,
        interval_s=3.0,
        sent_at=now,
    )
    state.readiness.observe(beat)
    live = "medmesh_router_live_workers"
    text = prometheus_text().decode()
    assert _sample(text, live, model=SPEC.name, model_version="1") == 1.0
    assert _sample(text, live, model=SPEC.name, model_version="2") is None
    stopping = {"state": "stopping", "sent_at": now + timedelta(seconds=1)}
    state.readiness.observe(beat.model_copy(update=stopping))
    assert _sample(prometheus_text().decode(), live, model=SPEC.name, model_version="1") == 0.0
