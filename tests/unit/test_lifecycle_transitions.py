"""The registry record (medmesh.ModelDeployment/1) and its transitions: deploy, steps, rollback."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from pydantic import ValidationError

from medmesh_contracts.events import Producer, to_wire
from medmesh_contracts.lifecycle import (
    LifecycleError,
    ModelDeployment,
    RolloutPolicy,
    VersionDeployment,
    advance,
    decision,
    deploy_version,
    pause,
    resume,
    roll_back,
    seed_deployment,
)

PRODUCER = Producer(service="test", instance="t-1")
NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


def _seed() -> ModelDeployment:
    return seed_deployment("deterioration", {1: 100}, PRODUCER, NOW, "test")


def test_seed_makes_the_heaviest_version_stable() -> None:
    """Seeding from spec weights 90/10 gives v1 stable at 90 and v2 canary at 10, revision 1."""
    seeded = seed_deployment("m", {1: 90, 2: 10}, PRODUCER, NOW, "test")
    assert seeded.revision == 1
    assert [(v.version, v.state, v.weight) for v in seeded.versions] == [
        (1, "stable", 90),
        (2, "canary", 10),
    ]


def test_deployment_round_trips_through_json() -> None:
    """A deployment serializes with schema medmesh.ModelDeployment/1 and parses back equal."""
    deployment = deploy_version(_seed(), 2, PRODUCER, NOW, "test")
    wire = to_wire(deployment)
    assert b'"schema":"medmesh.ModelDeployment/1"' in wire
    assert ModelDeployment.model_validate_json(wire) == deployment


def test_a_rollout_walks_every_step_then_becomes_stable() -> None:
    """deploy v2 then advance: 5, 10, 25, 50 % as canary, then v2 stable at 100 and v1 retired."""
    deployment = deploy_version(_seed(), 2, PRODUCER, NOW, "test")
    assert deployment.weights == {1: 100}
    assert deployment.rollout.phase == "progressing"
    seen = []
    for _ in range(5):
        deployment = advance(deployment, PRODUCER, NOW, "test")
        seen.append(deployment.weights)
    assert seen == [{1: 95, 2: 5}, {1: 90, 2: 10}, {1: 75, 2: 25}, {1: 50, 2: 50}, {2: 100}]
    assert deployment.stable.version == 2
    assert deployment.version(1).state == "retired"
    assert deployment.rollout.phase == "succeeded"
    assert deployment.revision == 7


def test_rollback_retires_the_canary_and_gives_stable_everything() -> None:
    """Rolling back v2 at 25 % leaves v1 stable at 100 % and v2 retired."""
    deployment = deploy_version(_seed(), 2, PRODUCER, NOW, "test")
    for _ in range(3):
        deployment = advance(deployment, PRODUCER, NOW, "test")
    back = roll_back(deployment, PRODUCER, NOW, "test")
    assert back.weights == {1: 100}
    assert back.version(2).state == "retired"
    assert back.rollout.phase == "rolled-back"


def test_pause_and_resume_only_change_the_phase() -> None:
    """Pause keeps the weights and stops the rollout; resume restarts the step's window."""
    deployment = advance(deploy_version(_seed(), 2, PRODUCER, NOW, "test"), PRODUCER, NOW, "t")
    paused = pause(deployment, PRODUCER, NOW, "test")
    assert (paused.weights, paused.rollout.phase) == (deployment.weights, "paused")
    assert resume(paused, PRODUCER, NOW, "test").rollout.phase == "progressing"


def test_a_second_rollout_is_refused_while_one_is_active() -> None:
    """Deploying v3 while v2 is being rolled out raises LifecycleError."""
    deployment = deploy_version(_seed(), 2, PRODUCER, NOW, "test")
    with pytest.raises(LifecycleError, match="being rolled out"):
        deploy_version(deployment, 3, PRODUCER, NOW, "test")


def test_a_shadow_deployment_mirrors_without_live_weight() -> None:
    """deploy as shadow: v2 has no weight, the policy's shadow share, and enters step 1 at 5 %."""
    policy = RolloutPolicy(shadow_percent=50)
    deployment = deploy_version(_seed(), 2, PRODUCER, NOW, "t", state="shadow", policy=policy)
    assert deployment.version(2) == VersionDeployment(
        version=2, state="shadow", weight=0, shadow_percent=50
    )
    assert advance(deployment, PRODUCER, NOW, "test").weights == {1: 95, 2: 5}


def test_inconsistent_deployments_and_policies_are_rejected() -> None:
    """Weights not adding to 100, two stables, or steps not ending at 100 fail validation."""
    with pytest.raises(ValidationError, match="add up to 100"):
        _seed().model_validate(
            {**_seed().model_dump(), "versions": [{"version": 1, "state": "stable", "weight": 90}]}
        )
    with pytest.raises(ValidationError, match="exactly one stable"):
        _seed().model_validate(
            {
                **_seed().model_dump(),
                "versions": [
                    {"version": 1, "state": "stable", "weight": 50},
                    {"version": 2, "state": "stable", "weight": 50},
                ],
            }
        )
    with pytest.raises(ValidationError, match="end at 100"):
        RolloutPolicy(steps=(5, 50))


def test_decision_records_weights_before_and_after() -> None:
    """The audit event of a step names the action, the actor and both weight tables."""
    before = advance(deploy_version(_seed(), 2, PRODUCER, NOW, "t"), PRODUCER, NOW, "t")
    after = advance(before, PRODUCER, NOW, "controller:r-1")
    audit = decision(before, after, "step", "controller:r-1", "healthy", PRODUCER, NOW)
    assert audit.schema_id == "medmesh.LifecycleDecision/1"
    assert (audit.weights_before, audit.weights_after) == ({1: 95, 2: 5}, {1: 90, 2: 10})
    assert (audit.version, audit.revision, audit.correlation_id) == (
        2,
        after.revision,
        after.correlation_id,
    )
