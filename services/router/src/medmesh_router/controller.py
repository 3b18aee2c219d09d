"""The progressive-delivery controller's judgement: pure, from a deployment and figures.

Flagger's loop on medmesh's own streams. For a rollout that is progressing:

- a canary registered at 0 % starts at the first step at once;
- at any time, once the version has served ``min_requests`` in the current step, an error rate
  above ``max_error_rate`` or a p99 above ``max_p99_ms`` rolls it back; in the shadow stage,
  an agreement with stable below ``min_shadow_agreement`` over ``min_requests`` comparisons too;
- after ``interval_s`` in a step: too few requests (or comparisons) holds; otherwise the version
  goes to the next step, and the last step (100 %) promotes it to stable.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from medmesh_contracts.lifecycle import PERCENT, ModelDeployment, RolloutPolicy, VersionFigures

Action = Literal["step", "promote", "hold", "rollback"]


@dataclass(frozen=True)
class Verdict:
    """What the controller does with a rollout now, and why (for the audit)."""

    action: Action
    reason: str


def _pct(value: float) -> str:
    return f"{value * 100:.1f} %"


def judge(deployment: ModelDeployment, figures: VersionFigures, now: datetime) -> Verdict | None:
    """The verdict on the rollout of ``deployment`` given its version's figures in this step."""
    rollout, policy = deployment.rollout, deployment.policy
    if rollout.phase != "progressing" or rollout.version is None:
        return None
    target = deployment.version(rollout.version)
    if target.state == "canary" and rollout.step < 0:
        return Verdict("step", f"rollout starts at {policy.steps[0]} %")
    if target.state not in ("canary", "shadow"):
        return None
    shadow = target.state == "shadow"
    failing = _failing(policy, figures, shadow=shadow)
    if failing is not None:
        return failing
    started = rollout.step_started_at or now
    if (now - started).total_seconds() < policy.interval_s:
        return None
    return _after_interval(policy, figures, policy.steps[rollout.step + 1], shadow=shadow)


def _failing(policy: RolloutPolicy, figures: VersionFigures, *, shadow: bool) -> Verdict | None:
    """A rollback verdict when a threshold is crossed over enough requests, else None."""
    reason = None
    if figures.requests >= policy.min_requests:
        if figures.error_rate > policy.max_error_rate:
            reason = (
                f"error rate {_pct(figures.error_rate)} > {_pct(policy.max_error_rate)} "
                f"over {figures.requests} requests"
            )
        elif figures.p99_ms is not None and figures.p99_ms > policy.max_p99_ms:
            reason = (
                f"p99 latency {figures.p99_ms:.0f} ms > {policy.max_p99_ms:.0f} ms "
                f"over {figures.requests} requests"
            )
    agreement = figures.shadow_agreement
    if (
        reason is None
        and shadow
        and agreement is not None
        and figures.shadow_compared >= policy.min_requests
        and agreement < policy.min_shadow_agreement
    ):
        reason = (
            f"shadow agreement {_pct(agreement)} < {_pct(policy.min_shadow_agreement)} "
            f"over {figures.shadow_compared} comparisons"
        )
    return Verdict("rollback", reason) if reason is not None else None


def _after_interval(
    policy: RolloutPolicy, figures: VersionFigures, following: int, *, shadow: bool
) -> Verdict:
    """Hold with too little evidence; otherwise the next step (or stable at 100 %)."""
    what = "comparisons" if shadow else "requests"
    seen = figures.shadow_compared if shadow else figures.requests
    if seen < policy.min_requests:
        return Verdict(
            "hold", f"only {seen} of {policy.min_requests} {what} after {policy.interval_s:.0f} s"
        )
    health = f"error rate {_pct(figures.error_rate)}"
    if figures.p99_ms is not None:
        health += f", p99 {figures.p99_ms:.0f} ms"
    if figures.shadow_agreement is not None:
        health += f", shadow agreement {_pct(figures.shadow_agreement)}"
    if following == PERCENT:
        return Verdict("promote", f"healthy over {seen} {what} ({health}): now stable")
    return Verdict("step", f"healthy over {seen} {what} ({health}): to {following} %")
