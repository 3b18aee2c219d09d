"""The router's start-up over what was read (medmesh_router.startup), shared with the monolith."""

from __future__ import annotations

from medmesh_contracts.events import Producer, to_wire, utc_now
from medmesh_contracts.lifecycle import ModelDeployment, deploy_version, seed_deployment
from medmesh_contracts.modelspec import load_specs
from medmesh_router.readiness import Readiness
from medmesh_router.startup import apply_registry, seed_unknown
from medmesh_router.state import RouterState
from medmesh_router.topic_reader import Consumed
from tests.service.conftest import SPECS_DIR

PRODUCER = Producer(service="test", instance="t-1")
MODEL = "deterioration"


def _state() -> RouterState:
    return RouterState(load_specs(SPECS_DIR), Readiness(require_heartbeats=False))


def test_registry_records_apply_in_log_order_and_every_offset_counts() -> None:
    """The last record of a model wins; tombstones and bad records are skipped but their offsets
    are the last read of their partitions; learn sees each deployment before it is applied."""
    now = utc_now()
    seeded = seed_deployment(MODEL, {1: 100}, PRODUCER, now, "test")
    deployed = deploy_version(seeded, 2, PRODUCER, now, "test")
    records = [
        Consumed(0, 0, to_wire(seeded)),
        Consumed(1, 0, b"not json"),
        Consumed(0, 1, to_wire(deployed)),
        Consumed(1, 1, None),
    ]
    state = _state()
    learned: list[ModelDeployment] = []

    last = apply_registry(state, records, now, learn=learned.append)

    assert last == {0: 1, 1: 1}
    assert learned == [seeded, deployed]
    assert state.deployments[MODEL] == deployed


def test_models_the_registry_lacks_are_seeded_from_their_spec_weights() -> None:
    """Only models without a deployment are seeded (revision 1, by the given writer), applied."""
    now = utc_now()
    state = _state()
    known = deploy_version(
        seed_deployment(MODEL, {1: 100}, PRODUCER, now, "test"), 2, PRODUCER, now, "test"
    )
    state.apply(known, now)

    seeds = seed_unknown(state, PRODUCER, now, "monolith")

    assert [s.model for s in seeds] == [m for m in state.specs if m != MODEL]
    assert all(s.revision == 1 and s.changed_by == "monolith" for s in seeds)
    for seed in seeds:
        assert seed.weights == state.specs[seed.model].routing.weights
        assert state.deployments[seed.model] == seed
    assert state.deployments[MODEL] == known
