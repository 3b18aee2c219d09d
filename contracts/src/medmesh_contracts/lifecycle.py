"""Model lifecycle, version 1: the deployment registry record and the audit of every decision.

``ModelDeployment`` is the whole routing state of one model; it lives on the compacted topic
``medmesh.models.registry`` keyed by model name (the latest record per model is the truth, and the
router rebuilds itself from it on start). ``LifecycleDecision`` goes to ``medmesh.models.audit``
for every change (by a person or by the rollout controller) and for every hold, with the figures
it was based on.

The transitions (``seed_deployment``, ``deploy_version``, ``advance``, ``roll_back``, ``pause``,
``resume``) are pure functions shared by every writer of the registry (the ``medmesh models`` CLI
and the router's rollout controller), so both apply the same rules. Writers are last-writer-wins
in log order, like compaction; every record carries a ``revision`` one above the one it replaced.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Literal, Protocol

from pydantic import AwareDatetime, ConfigDict, Field, model_validator

from medmesh_contracts.events import Envelope, Producer, WireModel, new_id

VersionState = Literal["shadow", "canary", "stable", "retired"]
RolloutPhase = Literal["idle", "progressing", "paused", "succeeded", "rolled-back"]
LifecycleAction = Literal[
    "seed",
    "deploy",
    "step",
    "promote",
    "hold",
    "rollback",
    "pause",
    "resume",
    "readiness-lost",
    "readiness-restored",
    "rules",
]
PERCENT = 100


class RoutingAttributes(Protocol):
    """Where a request came from, as rules see it: a SourceContext, or the router's headers."""

    @property
    def site(self) -> str | None: ...

    @property
    def ward(self) -> str | None: ...

    @property
    def source_system(self) -> str | None: ...


class RoutingRule(WireModel):
    """Pins requests whose source matches every attribute given here to one version."""

    version: int
    site: str | None = None
    ward: str | None = None
    source_system: str | None = None

    def matches(self, source: RoutingAttributes) -> bool:
        """True when each attribute the rule sets equals the request's (unset ones match all)."""
        return (
            (self.site is None or self.site == source.site)
            and (self.ward is None or self.ward == source.ward)
            and (self.source_system is None or self.source_system == source.source_system)
        )


class RolloutPolicy(WireModel):
    """Flagger-style progressive delivery: steps of live traffic, each judged after an interval.

    A step is judged once ``interval_s`` has passed and the version has served at least
    ``min_requests`` in it: above ``max_error_rate`` or ``max_p99_ms`` (or, in the shadow stage,
    below ``min_shadow_agreement``) it is rolled back, otherwise it goes to the next step. Too few
    requests: it holds. A version deployed as shadow first receives ``shadow_percent`` of traffic
    as mirrored copies, and enters the first step when its agreement with stable is good enough.
    """

    steps: tuple[int, ...] = (5, 10, 25, 50, 100)
    interval_s: float = 60.0
    min_requests: int = 50
    max_error_rate: float = 0.05
    max_p99_ms: float = 2000.0
    min_shadow_agreement: float = 0.9
    shadow_percent: int = 100

    @model_validator(mode="after")
    def _steps_rise_to_100(self) -> RolloutPolicy:
        steps = self.steps
        if not steps or steps[-1] != PERCENT:
            raise ValueError("rollout steps must end at 100")
        if any(not 0 < s <= PERCENT for s in steps) or list(steps) != sorted(set(steps)):
            raise ValueError("rollout steps must rise strictly within 1..100")
        if not 0 <= self.shadow_percent <= PERCENT:
            raise ValueError("shadow_percent must be within 0..100")
        return self


class VersionDeployment(WireModel):
    """One version of a model in the registry: its state and share of traffic (percent)."""

    version: int
    state: VersionState
    weight: int = 0
    # Percentage of requests mirrored to this version (state ``shadow`` only); never reported.
    shadow_percent: int = 0


class Rollout(WireModel):
    """Where the progressive delivery of one version stands (persisted: survives restarts)."""

    version: int | None = None
    phase: RolloutPhase = "idle"
    # Index into the policy's steps; -1 before the first step (shadow stage, or 0 %).
    step: int = -1
    step_started_at: AwareDatetime | None = None


class ModelDeployment(Envelope):
    """The registry record of one model: versions, weights, rules, policy and rollout.

    ``correlation_id`` is the id of the ``LifecycleDecision`` that produced this revision.
    """

    schema_id: Literal["medmesh.ModelDeployment/1"] = Field(
        default="medmesh.ModelDeployment/1", alias="schema"
    )
    model: str
    revision: int
    versions: tuple[VersionDeployment, ...]
    rules: tuple[RoutingRule, ...] = ()
    policy: RolloutPolicy = RolloutPolicy()
    rollout: Rollout = Rollout()
    changed_by: str
    changed_at: AwareDatetime

    model_config = ConfigDict(frozen=True, extra="ignore", populate_by_name=True)

    @model_validator(mode="after")
    def _consistent(self) -> ModelDeployment:
        numbers = [v.version for v in self.versions]
        if len(numbers) != len(set(numbers)):
            raise ValueError("a version appears twice in the deployment")
        stable = [v for v in self.versions if v.state == "stable"]
        if len(stable) != 1:
            raise ValueError("a deployment has exactly one stable version")
        if sum(v.weight for v in self.versions) != PERCENT:
            raise ValueError("version weights must add up to 100")
        if any(v.weight and v.state in ("shadow", "retired") for v in self.versions):
            raise ValueError("shadow and retired versions carry no live weight")
        return self

    @property
    def stable(self) -> VersionDeployment:
        """The stable version (the one that takes every share nobody else can serve)."""
        return next(v for v in self.versions if v.state == "stable")

    def version(self, number: int) -> VersionDeployment:
        """One version's entry; KeyError when it is not in the registry."""
        for v in self.versions:
            if v.version == number:
                return v
        raise KeyError(f"model {self.model!r} has no version {number} in the registry")

    @property
    def weights(self) -> dict[int, int]:
        """Live weights of the versions that have any."""
        return {v.version: v.weight for v in self.versions if v.weight}


class VersionFigures(WireModel):
    """What a version did in one window: the evidence behind a lifecycle decision."""

    version: int
    window_s: float
    requests: int
    failures: int
    error_rate: float
    p50_ms: float | None = None
    p99_ms: float | None = None
    shadow_compared: int = 0
    # Share of mirrored requests whose risk band equals stable's, and the mean |score difference|.
    shadow_agreement: float | None = None
    shadow_mean_abs_diff: float | None = None


class LifecycleDecision(Envelope):
    """Audit event: who decided what about a model's versions, when, why, and on which figures."""

    schema_id: Literal["medmesh.LifecycleDecision/1"] = Field(
        default="medmesh.LifecycleDecision/1", alias="schema"
    )
    model: str
    action: LifecycleAction
    version: int | None = None
    actor: str
    reason: str
    revision: int
    weights_before: dict[int, int]
    weights_after: dict[int, int]
    figures: tuple[VersionFigures, ...] = ()
    decided_at: AwareDatetime

    model_config = ConfigDict(frozen=True, extra="ignore", populate_by_name=True)


class LifecycleError(ValueError):
    """A lifecycle change that the current deployment does not allow."""


# --- transitions (pure) ---------------------------------------------------------------------


def seed_deployment(
    model: str,
    weights: Mapping[int, int],
    producer: Producer,
    now: datetime,
    actor: str,
    policy: RolloutPolicy | None = None,
) -> ModelDeployment:
    """Revision 1 from a spec's routing weights: the heaviest version is stable, others canary."""
    stable = max(sorted(weights), key=lambda v: weights[v])
    versions = tuple(
        VersionDeployment(version=v, state="stable" if v == stable else "canary", weight=weights[v])
        for v in sorted(weights)
    )
    return ModelDeployment(
        correlation_id=new_id(),
        producer=producer,
        occurred_at=now,
        model=model,
        revision=1,
        versions=versions,
        policy=policy or RolloutPolicy(),
        changed_by=actor,
        changed_at=now,
    )


def _revised(
    current: ModelDeployment,
    producer: Producer,
    now: datetime,
    actor: str,
    *,
    versions: tuple[VersionDeployment, ...] | None = None,
    rollout: Rollout | None = None,
    policy: RolloutPolicy | None = None,
    rules: tuple[RoutingRule, ...] | None = None,
) -> ModelDeployment:
    return ModelDeployment(
        correlation_id=new_id(),
        producer=producer,
        occurred_at=now,
        model=current.model,
        revision=current.revision + 1,
        versions=current.versions if versions is None else versions,
        rules=current.rules if rules is None else rules,
        policy=policy or current.policy,
        rollout=current.rollout if rollout is None else rollout,
        changed_by=actor,
        changed_at=now,
    )


def rollout_active(deployment: ModelDeployment) -> bool:
    """True while a version is being rolled out (progressing or paused)."""
    return deployment.rollout.version is not None and deployment.rollout.phase in (
        "progressing",
        "paused",
    )


def deploy_version(
    current: ModelDeployment,
    version: int,
    producer: Producer,
    now: datetime,
    actor: str,
    *,
    state: Literal["canary", "shadow"] = "canary",
    start: bool = True,
    policy: RolloutPolicy | None = None,
) -> ModelDeployment:
    """Register a version as canary at 0 % (or shadow) and start (or pause) its rollout."""
    if rollout_active(current) and current.rollout.version != version:
        raise LifecycleError(
            f"{current.model} v{current.rollout.version} is being rolled out "
            f"({current.rollout.phase}); roll it back or let it finish first"
        )
    if version == current.stable.version:
        raise LifecycleError(f"{current.model} v{version} is already the stable version")
    policy = policy or current.policy
    shadow = policy.shadow_percent if state == "shadow" else 0
    entry = VersionDeployment(version=version, state=state, weight=0, shadow_percent=shadow)
    others = [v for v in current.versions if v.version != version]
    freed = sum(v.weight for v in current.versions if v.version == version)
    versions = tuple(
        sorted(
            [
                v.model_copy(update={"weight": v.weight + freed}) if v.state == "stable" else v
                for v in others
            ]
            + [entry],
            key=lambda v: v.version,
        )
    )
    rollout = Rollout(
        version=version,
        phase="progressing" if start else "paused",
        step=-1,
        step_started_at=now,
    )
    return _revised(
        current, producer, now, actor, versions=versions, rollout=rollout, policy=policy
    )


def advance(
    current: ModelDeployment, producer: Producer, now: datetime, actor: str
) -> ModelDeployment:
    """Move the version under rollout to its next step; at 100 % it becomes the stable version."""
    rollout = current.rollout
    if rollout.version is None or not rollout_active(current):
        raise LifecycleError(f"{current.model} has no rollout in progress")
    steps = current.policy.steps
    step = rollout.step + 1
    target = rollout.version
    weight = steps[step]
    if weight == PERCENT:
        versions = tuple(
            VersionDeployment(version=v.version, state="stable", weight=PERCENT)
            if v.version == target
            else v.model_copy(
                update={
                    "state": "retired" if v.state == "stable" else v.state,
                    "weight": 0,
                }
            )
            for v in current.versions
        )
        done = Rollout(version=target, phase="succeeded", step=step, step_started_at=now)
        return _revised(current, producer, now, actor, versions=versions, rollout=done)
    others = sum(v.weight for v in current.versions if v.version != target and v.state != "stable")
    stable_weight = PERCENT - weight - others
    if stable_weight < 0:
        raise LifecycleError(f"step {weight} % leaves no room beside the other canaries")
    versions = tuple(
        VersionDeployment(version=v.version, state="canary", weight=weight)
        if v.version == target
        else (v.model_copy(update={"weight": stable_weight}) if v.state == "stable" else v)
        for v in current.versions
    )
    moved = rollout.model_copy(update={"step": step, "step_started_at": now})
    return _revised(current, producer, now, actor, versions=versions, rollout=moved)


def roll_back(
    current: ModelDeployment, producer: Producer, now: datetime, actor: str
) -> ModelDeployment:
    """Retire the version under rollout (or, with none, every canary and shadow); stable takes
    back the traffic they had."""
    target = current.rollout.version if rollout_active(current) else None

    def retired(v: VersionDeployment) -> bool:
        if target is None:
            return v.state in ("canary", "shadow")
        return v.version == target

    if not any(retired(v) for v in current.versions):
        raise LifecycleError(f"{current.model} has no canary or shadow version to roll back")
    kept = sum(v.weight for v in current.versions if v.state == "canary" and not retired(v))
    versions = tuple(
        v.model_copy(update={"weight": PERCENT - kept})
        if v.state == "stable"
        else (VersionDeployment(version=v.version, state="retired") if retired(v) else v)
        for v in current.versions
    )
    rollout = Rollout(
        version=target if target is not None else current.rollout.version,
        phase="rolled-back",
        step=-1,
        step_started_at=now,
    )
    return _revised(current, producer, now, actor, versions=versions, rollout=rollout)


def pause(
    current: ModelDeployment, producer: Producer, now: datetime, actor: str
) -> ModelDeployment:
    """Stop the controller from moving the rollout (weights stay as they are)."""
    if not rollout_active(current):
        raise LifecycleError(f"{current.model} has no rollout in progress")
    rollout = current.rollout.model_copy(update={"phase": "paused"})
    return _revised(current, producer, now, actor, rollout=rollout)


def resume(
    current: ModelDeployment, producer: Producer, now: datetime, actor: str
) -> ModelDeployment:
    """Let the controller judge the rollout again; the current step's window starts afresh."""
    if not rollout_active(current):
        raise LifecycleError(f"{current.model} has no rollout in progress")
    rollout = current.rollout.model_copy(update={"phase": "progressing", "step_started_at": now})
    return _revised(current, producer, now, actor, rollout=rollout)


def with_rules(
    current: ModelDeployment,
    rules: tuple[RoutingRule, ...],
    producer: Producer,
    now: datetime,
    actor: str,
) -> ModelDeployment:
    """Replace the routing rules (each must name a version in the registry)."""
    known = {v.version for v in current.versions}
    unknown = sorted({r.version for r in rules} - known)
    if unknown:
        raise LifecycleError(f"rules name versions not in the registry: {unknown}")
    return _revised(current, producer, now, actor, rules=rules)


def decision(
    before: ModelDeployment | None,
    after: ModelDeployment,
    action: LifecycleAction,
    actor: str,
    reason: str,
    producer: Producer,
    now: datetime,
    *,
    version: int | None = None,
    figures: tuple[VersionFigures, ...] = (),
) -> LifecycleDecision:
    """The audit event of a change from ``before`` to ``after`` (equal for holds)."""
    return LifecycleDecision(
        event_id=after.correlation_id if after is not before else new_id(),
        correlation_id=after.correlation_id,
        producer=producer,
        occurred_at=now,
        model=after.model,
        action=action,
        version=version if version is not None else after.rollout.version,
        actor=actor,
        reason=reason,
        revision=after.revision,
        weights_before=before.weights if before is not None else {},
        weights_after=after.weights,
        figures=figures,
        decided_at=now,
    )


LIFECYCLE_EVENTS: tuple[type[Envelope], ...] = (ModelDeployment, LifecycleDecision)
