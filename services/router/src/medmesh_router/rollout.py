"""The rollout: readiness audits, the controller's verdicts applied, the hold throttle, and the
status view of every model (``GET /models``).

The verdicts themselves are ``controller.judge``'s, the registry transitions
``medmesh_contracts.lifecycle``'s, the figures ``analysis.Analysis``'s; this module applies them
to the router's state and says what to publish. It does no I/O: the router passes in how a
registry change and an audit event are published.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any

from medmesh_contracts.events import Producer, to_wire
from medmesh_contracts.lifecycle import (
    LifecycleAction,
    LifecycleDecision,
    ModelDeployment,
    VersionFigures,
    advance,
    decision,
    roll_back,
    rollout_active,
)
from medmesh_router.analysis import Analysis
from medmesh_router.controller import judge
from medmesh_router.metrics import RouterMetrics
from medmesh_router.state import RouterState

# Publishes a new registry record and its audit event; publishes one audit event.
PublishChange = Callable[[ModelDeployment, LifecycleDecision], Awaitable[None]]
PublishAudit = Callable[[LifecycleDecision], Awaitable[None]]


class Rollout:
    """Applies readiness changes and the controller's verdicts to the router's state."""

    def __init__(
        self,
        state: RouterState,
        analysis: Analysis,
        producer: Producer,
        actor: str,
        publish_change: PublishChange,
        publish_audit: PublishAudit,
        *,
        controller: bool = True,
        metrics: RouterMetrics | None = None,
    ) -> None:
        self.state = state
        self.analysis = analysis
        self.producer = producer
        self.actor = actor
        self._publish_change = publish_change
        self._publish_audit = publish_audit
        # Off: readiness is still audited, but no rollout is judged (one controller per fleet).
        self.controller = controller
        self.metrics = metrics
        # When a "hold" was last audited per (model, revision, step): once per interval at most.
        self._last_hold: dict[tuple[str, int, int], float] = {}

    def figures(self, deployment: ModelDeployment, version: int, now: datetime) -> VersionFigures:
        """A version's figures: since its step started when under rollout, else one interval."""
        rollout = deployment.rollout
        since = None
        if rollout.version == version and rollout_active(deployment):
            since = rollout.step_started_at
        if since is None:
            since = now - timedelta(seconds=deployment.policy.interval_s)
        return self.analysis.figures(deployment.model, version, since, now)

    async def tick(self, now: datetime) -> None:
        """Audit readiness changes; let the controller judge every progressing rollout."""
        await self.audit_readiness(now)
        if not self.controller:
            return
        for deployment in list(self.state.deployments.values()):
            await self._judge(deployment, now)

    async def audit_readiness(self, now: datetime) -> None:
        """Re-evaluate which versions can serve; audit each change (routing follows at once)."""
        for change in self.state.refresh(now):
            deployment = self.state.deployments[change.model]
            action: LifecycleAction = "readiness-restored" if change.servable else "readiness-lost"
            effective = self.state.tables[change.model].weights
            reason = (
                f"v{change.version} has live ready workers again"
                if change.servable
                else f"v{change.version} has no live ready worker: its share goes to stable"
            )
            audit = decision(
                deployment,
                deployment,
                action,
                self.actor,
                f"{reason}; routing {effective}",
                self.producer,
                now,
                version=change.version,
                figures=(self.figures(deployment, change.version, now),),
            )
            await self._publish_audit(audit)

    async def _judge(self, deployment: ModelDeployment, now: datetime) -> None:
        version = deployment.rollout.version
        if version is None or deployment.rollout.phase != "progressing":
            return
        figures = self.figures(deployment, version, now)
        verdict = judge(deployment, figures, now)
        if self.metrics is not None:
            self.metrics.evaluated(
                deployment.model, "pending" if verdict is None else verdict.action
            )
        if verdict is None:
            return
        if verdict.action == "hold":
            key = (deployment.model, deployment.revision, deployment.rollout.step)
            last = self._last_hold.get(key)
            if last is not None and now.timestamp() - last < deployment.policy.interval_s:
                return
            self._last_hold[key] = now.timestamp()
            await self._publish_audit(
                decision(
                    deployment,
                    deployment,
                    "hold",
                    self.actor,
                    verdict.reason,
                    self.producer,
                    now,
                    figures=(figures,),
                )
            )
            return
        if verdict.action == "rollback":
            changed = roll_back(deployment, self.producer, now, self.actor)
        else:
            changed = advance(deployment, self.producer, now, self.actor)
        audit = decision(
            deployment,
            changed,
            verdict.action,
            self.actor,
            verdict.reason,
            self.producer,
            now,
            version=version,
            figures=(figures,),
        )
        self.state.apply(changed, now)
        await self._publish_change(changed, audit)

    def status(self, now: datetime, unreadable_outcomes: int = 0) -> dict[str, Any]:
        """Every model's registry record, effective routing and per-version figures (JSON)."""
        models: dict[str, Any] = {}
        for name, deployment in self.state.deployments.items():
            table = self.state.tables[name]
            rollout, policy = deployment.rollout, deployment.policy
            next_in = None
            if rollout.phase == "progressing" and rollout.step_started_at is not None:
                elapsed = (now - rollout.step_started_at).total_seconds()
                next_in = max(0.0, policy.interval_s - elapsed)
            models[name] = {
                "deployment": json.loads(to_wire(deployment)),
                "effective_weights": table.weights,
                "next_judgement_in_s": next_in,
                "versions": {
                    str(v.version): {
                        "servable": self.state.servable(name, v.version, now),
                        "live_workers": self.state.readiness.live_workers(name, v.version, now),
                        "heartbeats_seen": self.state.readiness.seen(name, v.version),
                        "figures": self.figures(deployment, v.version, now).model_dump(mode="json"),
                    }
                    for v in deployment.versions
                },
            }
        return {
            "at": now.isoformat(),
            "models": models,
            "unreadable_outcomes": unreadable_outcomes,
        }
