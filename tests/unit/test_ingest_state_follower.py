"""The readings state follower: one record it cannot apply neither stops it nor drops the rest."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from medmesh_contracts import topics
from medmesh_contracts.events import to_wire
from medmesh_ingest.readings import ReadingsStore, state_key
from medmesh_ingest.settings import IngestSettings
from medmesh_ingest.state_topic import ReadingsFollower
from tests.unit.test_ingest_state_bound import held, state


class OnePoll:
    """A consumer whose next poll returns the given records."""

    def __init__(self, records: list[SimpleNamespace]) -> None:
        self.records = records

    async def getmany(self, timeout_ms: int) -> dict[str, list[SimpleNamespace]]:
        return {"medmesh.ingest.readings-0": self.records}


def _record(offset: int, value: bytes | None, key: bytes = b"k") -> SimpleNamespace:
    return SimpleNamespace(
        topic=topics.INGEST_READINGS, key=key, offset=offset, partition=0, value=value
    )


async def test_an_unreadable_record_is_skipped_counted_and_its_neighbours_applied() -> None:
    """Garbage, a state that fails to be stored, and two good states in one poll: the two good
    ones are stored, the other two are counted as skipped."""
    store = ReadingsStore()
    follower = ReadingsFollower(store, IngestSettings())
    good = [state("p1", 1), state("p2", 2)]

    def raising_put(new: Any, based_on: Any = None) -> None:
        if new.patient_pseudonym == "p3":
            raise ArithmeticError("a bug in storing")
        original_put(new, based_on)

    original_put = store.put
    records = [
        _record(0, b"\xff not a state"),
        _record(1, to_wire(good[0]), state_key("p1", "deterioration").encode()),
        _record(2, to_wire(state("p3", 3))),
        _record(3, to_wire(good[1]), state_key("p2", "deterioration").encode()),
    ]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(store, "put", raising_put)
        await follower._apply_next(OnePoll(records), timeout_ms=0)

    assert held(store) == {"p1", "p2"}
    assert (follower.applied, follower.skipped) == (4, 2)
