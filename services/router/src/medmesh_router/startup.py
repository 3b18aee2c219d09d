"""The router's start-up over what was read: registry records into the state, then a seed from
its spec's weights for each model the registry does not know. No I/O: the caller reads the topics
(``app.read_topic_to_end``). Shared by the router (``app.Router.load``) and the monolith
(``medmesh_monolith.app``), so both start from the same routing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Protocol, TypeVar

from pydantic import BaseModel, ValidationError

from medmesh_contracts.events import Producer
from medmesh_contracts.lifecycle import ModelDeployment, seed_deployment
from medmesh_router.state import RouterState
from medmesh_runtime.logging import get_logger

Parsed = TypeVar("Parsed", bound=BaseModel)
log = get_logger("medmesh.router")


class StartRecord(Protocol):
    """A record read at start (``app.Consumed``), with where it was in its topic."""

    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def value(self) -> bytes | None: ...


def parse_record(model: type[Parsed], record: StartRecord, *, owned: bool = True) -> Parsed | None:
    """A record read at start as ``model``; None for tombstones and bad records. A bad record of
    a topic the router owns is logged; results and failures (``owned=False``) are reporting's,
    whose dead letter already names them, as for the followers."""
    if not record.value:
        return None
    try:
        return model.model_validate_json(record.value)
    except ValidationError as exc:
        if owned:
            log.warning("record ignored at start", offset=record.offset, error=str(exc))
        return None


def apply_registry(
    state: RouterState,
    records: Iterable[StartRecord],
    now: datetime,
    learn: Callable[[ModelDeployment], None] | None = None,
) -> dict[int, int]:
    """Apply the registry's records in log order (``learn`` sees each deployment first); the
    last offset read per partition, tombstones and bad records included."""
    last: dict[int, int] = {}
    for record in records:
        last[record.partition] = record.offset
        deployment = parse_record(ModelDeployment, record)
        if deployment is not None:
            if learn is not None:
                learn(deployment)
            state.apply(deployment, now)
    return last


def seed_unknown(
    state: RouterState, producer: Producer, now: datetime, changed_by: str
) -> list[ModelDeployment]:
    """Seed every model of the specs the state has no deployment for from its spec's
    ``routing.weights`` (revision 1), applied to the state; the seeds, in spec order."""
    seeds = []
    for name, spec in state.specs.items():
        if name in state.deployments:
            continue
        seeded = seed_deployment(name, spec.routing.weights, producer, now, changed_by)
        state.apply(seeded, now)
        seeds.append(seeded)
    return seeds
