"""The router's figures on /metrics: where requests went and why, and what the rollout is doing.

- ``medmesh.router.tasks`` (counter): tasks routed, by model, version and reason (``bucket``,
  ``rule``, ``shadow``): the per-version traffic a canary's share is read from.
- ``medmesh.router.rollout.evaluations`` (counter): the controller's judgements of a progressing
  rollout, by model and verdict (``advance``, ``hold``, ``rollback``, ``pending`` while a step's
  interval or its minimum of requests has not passed).
- ``medmesh.router.weight`` (gauge): each version's effective share of traffic in percent.
- ``medmesh.router.rollout.step`` (gauge): the step index of each model's rollout (-1 before the
  first), labelled with the rollout's phase and the version it rolls out.
- ``medmesh.router.live_workers`` (gauge): the ready workers with a recent heartbeat of each
  deployed version whose workers have ever sent one (0 then means its heartbeats stopped).

Counts are added once per poll (or judgement), not per record: routing is the router's hot path.
The gauges are read from the router's state when Prometheus scrapes: the state of the latest
RouterMetrics (one router per process; the SDK keeps an instrument's first callbacks, so they read
the state through the class, not the instance that registered them).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence

from opentelemetry.metrics import CallbackOptions, Observation

from medmesh_contracts.events import utc_now
from medmesh_router.routing import RoutedWire
from medmesh_router.state import RouterState
from medmesh_runtime.metrics import meter


class RouterMetrics:
    """The router's instruments; the gauges observe ``state``."""

    observed: RouterState | None = None

    def __init__(self, state: RouterState) -> None:
        RouterMetrics.observed = state
        m = meter("medmesh.router")
        self._tasks = m.create_counter(
            "medmesh.router.tasks",
            unit="{task}",
            description="Tasks routed, by model, version and reason (bucket, rule, shadow)",
        )
        self._evaluations = m.create_counter(
            "medmesh.router.rollout.evaluations",
            unit="{evaluation}",
            description="Rollout controller judgements, by model and verdict",
        )
        m.create_observable_gauge(
            "medmesh.router.weight",
            callbacks=[self._weights],
            unit="%",
            description="Each model version's effective share of traffic",
        )
        m.create_observable_gauge(
            "medmesh.router.rollout.step",
            callbacks=[self._steps],
            unit="{step}",
            description="The rollout's step index per model (-1 before the first step)",
        )
        m.create_observable_gauge(
            "medmesh.router.live_workers",
            callbacks=[self._live_workers],
            unit="{worker}",
            description="Ready workers with a recent heartbeat, per version that ever sent one",
        )

    def routed(self, model_tasks: Iterable[tuple[str, Sequence[RoutedWire]]]) -> None:
        """Count one poll's tasks, each (model, tasks of one request)."""
        counts = Counter(
            (model, task.version, task.decision.reason)
            for model, tasks in model_tasks
            for task in tasks
        )
        for (model, version, reason), count in counts.items():
            self._tasks.add(
                count, {"model": model, "model_version": str(version), "reason": reason}
            )

    def evaluated(self, model: str, verdict: str) -> None:
        """Count one judgement of ``model``'s progressing rollout."""
        self._evaluations.add(1, {"model": model, "verdict": verdict})

    @staticmethod
    def _weights(_options: CallbackOptions) -> Iterable[Observation]:
        state = RouterMetrics.observed
        if state is None:
            return
        for model, table in list(state.tables.items()):
            for version, weight in table.weights.items():
                yield Observation(weight, {"model": model, "model_version": str(version)})

    @staticmethod
    def _steps(_options: CallbackOptions) -> Iterable[Observation]:
        state = RouterMetrics.observed
        if state is None:
            return
        for model, deployment in list(state.deployments.items()):
            rollout = deployment.rollout
            yield Observation(
                rollout.step,
                {
                    "model": model,
                    "phase": rollout.phase,
                    "model_version": "" if rollout.version is None else str(rollout.version),
                },
            )

    @staticmethod
    def _live_workers(_options: CallbackOptions) -> Iterable[Observation]:
        state = RouterMetrics.observed
        if state is None:
            return
        now = utc_now()
        for model, deployment in list(state.deployments.items()):
            for version in deployment.versions:
                if state.readiness.seen(model, version.version):
                    yield Observation(
                        state.readiness.live_workers(model, version.version, now),
                        {"model": model, "model_version": str(version.version)},
                    )
