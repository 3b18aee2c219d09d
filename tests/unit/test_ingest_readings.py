"""Per-patient readings state and when to ask for a score (medmesh_ingest.readings)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
from pydantic import ValidationError

from medmesh_contracts.events import ModelInput, PatientReadingsUpdated, Producer, to_wire
from medmesh_contracts.modelspec import load_spec
from medmesh_ingest.extraction import Order, PatientReadings, Reading
from medmesh_ingest.readings import Merged, ReadingsStore, combine, merge, state_key
from medmesh_ingest.settings import IngestSettings
from medmesh_ingest.state_topic import ReadingsFollower

SPEC = load_spec(Path(__file__).parents[2] / "deploy" / "models" / "deterioration.yaml")
PRODUCER = Producer(service="ingest", instance="test")
T0 = datetime(2026, 11, 23, 8, 0, tzinfo=UTC)
UNITS = {
    "respiratory_rate": "/min",
    "spo2": "%",
    "supplemental_oxygen": "1",
    "temperature": "Cel",
    "systolic_bp": "mm[Hg]",
    "heart_rate": "/min",
    "not_alert": "1",
}
NORMAL = {
    "respiratory_rate": 16,
    "spo2": 97,
    "temperature": 37.0,
    "systolic_bp": 120,
    "heart_rate": 70,
    "not_alert": 0,
}


def reading(
    name: str, value: float, at: datetime = T0, source: str | None = None, version: str | None = "1"
) -> Reading:
    return Reading(
        ModelInput(
            name=name,
            value=value,
            unit=UNITS[name],
            observed_at=at,
            source_reference=source or f"Observation/{name}",
        ),
        version,
    )


def found(*readings: Reading) -> PatientReadings:
    return PatientReadings("deterioration", "Patient/p1", None, {r.input.name: r for r in readings})


def step(
    previous: PatientReadingsUpdated | None,
    *readings: Reading,
    order: Order | None = None,
    lookback: timedelta = timedelta(hours=4),
) -> Merged:
    return merge(
        previous,
        spec=SPEC,
        pseudonym="pabc",
        found=found(*readings) if readings else None,
        order=order,
        received_at=T0 + timedelta(hours=1),
        lookback=lookback,
        producer=PRODUCER,
    )


def complete(at: datetime = T0) -> list[Reading]:
    return [reading(name, value, at) for name, value in NORMAL.items()]


def test_partial_readings_are_kept_and_name_what_is_missing() -> None:
    """A first reading is stored; nothing is sent; the missing required inputs are named."""
    merged = step(None, reading("heart_rate", 80))
    assert merged.inputs is None
    assert merged.changed
    assert "spo2" in merged.missing
    assert [r.name for r in merged.state.readings] == ["heart_rate"]


def test_last_missing_reading_completes_the_set() -> None:
    """Readings arriving one by one give inputs once all required ones are in, defaults filled."""
    state: PatientReadingsUpdated | None = None
    sent = []
    for r in complete():
        merged = step(state, r)
        state = merged.state
        sent.append(merged.inputs is not None)
    assert sent == [False] * 5 + [True]
    assert merged.inputs is not None
    values = {i.name: i.value for i in merged.inputs}
    assert values["supplemental_oxygen"] == 0  # the spec's default: breathing air
    assert [i.name for i in merged.inputs] == [i.name for i in SPEC.inputs]


def test_unchanged_set_is_not_sent_twice() -> None:
    """The same complete set again is a duplicate: no inputs, state unchanged."""
    first = step(None, *complete())
    again = step(first.state, *complete())
    assert first.inputs is not None
    assert again.inputs is None
    assert again.duplicate
    assert not again.changed


def test_same_resource_version_is_ignored_new_version_replaces() -> None:
    """Same source and versionId keeps the stored value; a new version (correction) replaces it."""
    first = step(None, *complete())
    same_version = step(first.state, reading("heart_rate", 999, T0))
    assert same_version.inputs is None
    corrected = step(first.state, reading("heart_rate", 84, T0, version="2"))
    assert corrected.inputs is not None
    assert {i.name: i.value for i in corrected.inputs}["heart_rate"] == 84


def test_older_reading_of_another_source_does_not_replace_a_newer_one() -> None:
    """The latest reading wins: an older one from another Observation changes nothing."""
    first = step(None, *complete())
    older = step(
        first.state, reading("heart_rate", 130, T0 - timedelta(minutes=5), "Observation/x")
    )
    assert not older.changed
    newer = step(
        first.state, reading("heart_rate", 130, T0 + timedelta(minutes=5), "Observation/y")
    )
    assert newer.inputs is not None


def test_readings_outside_the_lookback_window_expire() -> None:
    """A reading older than the window before the newest one no longer counts."""
    old = step(None, *complete(T0 - timedelta(hours=6)))
    fresh = step(old.state, reading("heart_rate", 75, T0, "Observation/hr-2"))
    assert fresh.inputs is None
    assert set(fresh.missing) == {
        "respiratory_rate",
        "spo2",
        "temperature",
        "systolic_bp",
        "not_alert",
    }
    assert [r.name for r in fresh.state.readings] == ["heart_rate"]


def test_order_is_answered_once_with_based_on() -> None:
    """An order sends the current set with basedOn, even when unchanged, but only once."""
    order = Order("deterioration", "Patient/p1", None, "ServiceRequest/o1", "1")
    scored = step(None, *complete())
    ordered = step(scored.state, order=order)
    assert ordered.inputs is not None
    assert ordered.based_on_reference == "ServiceRequest/o1"
    again = step(ordered.state, order=order)
    assert again.inputs is None
    assert again.duplicate


def test_order_without_readings_names_the_missing_inputs() -> None:
    """An order for a patient without readings sends nothing and names every required input."""
    order = Order("deterioration", "Patient/p1", None, "ServiceRequest/o1")
    merged = step(None, order=order)
    assert merged.inputs is None
    assert len(merged.missing) == 6


def test_store_keeps_the_newest_state_per_key() -> None:
    """ReadingsStore keeps the latest state per pseudonym and model; older updates lose."""
    store = ReadingsStore()
    newer = step(None, reading("heart_rate", 80)).state
    older = newer.model_copy(update={"updated_at": newer.updated_at - timedelta(minutes=1)})
    store.put(newer)
    store.put(older)
    assert store.get("pabc", "deterioration") is newer
    assert len(store) == 1
    assert state_key("pabc", "deterioration") == "pabc|deterioration"


READINGS = "medmesh.ingest.readings"


async def test_follower_skips_its_own_acknowledged_write_and_applies_the_others() -> None:
    """The follower does not parse back this instance's acknowledged write (same key and
    offset); another instance's record of the same key, at a later offset, is applied."""
    store = ReadingsStore()
    mine = step(None, reading("heart_rate", 80)).state
    theirs = mine.model_copy(update={"updated_at": mine.updated_at + timedelta(minutes=1)})
    # Stands for the bytes at the own write's offset: newest of all, so parsing it would show.
    unread = mine.model_copy(update={"updated_at": mine.updated_at + timedelta(minutes=2)})
    key = state_key("pabc", "deterioration")
    store.put(mine)
    store.written(key, 41)
    records = [
        SimpleNamespace(topic=READINGS, key=key.encode(), offset=41, value=to_wire(unread)),
        SimpleNamespace(topic=READINGS, key=key.encode(), offset=42, value=to_wire(theirs)),
    ]

    class OnePoll:
        async def getmany(self, timeout_ms: int) -> dict[str, list[SimpleNamespace]]:
            return {"medmesh.ingest.readings-0": records}

    follower = ReadingsFollower(store, IngestSettings())
    await follower._apply_next(OnePoll(), timeout_ms=0)
    assert store.get("pabc", "deterioration") == theirs
    assert follower.applied == 2


def _merged_at(
    previous: PatientReadingsUpdated | None, at: datetime, instance: str, *readings: Reading
) -> PatientReadingsUpdated:
    return merge(
        previous,
        spec=SPEC,
        pseudonym="pabc",
        found=found(*readings),
        order=None,
        received_at=at,
        lookback=timedelta(hours=4),
        producer=Producer(service="ingest", instance=instance),
    ).state


def test_states_two_instances_merged_at_once_combine_to_both_readings_either_way() -> None:
    """Two instances add different readings to the same state at once: combining keeps both,
    and gives the same readings whichever state is held (every follower converges)."""
    base = _merged_at(None, T0, "a", reading("respiratory_rate", 16))
    on_a = _merged_at(base, T0 + timedelta(seconds=1), "a", reading("spo2", 97))
    on_b = _merged_at(base, T0 + timedelta(seconds=1), "b", reading("heart_rate", 70))
    held_a, held_b = combine(on_a, on_b), combine(on_b, on_a)
    assert {r.name for r in held_a.readings} == {"respiratory_rate", "spo2", "heart_rate"}
    assert held_a.readings == held_b.readings


def test_combining_with_a_successor_state_keeps_its_correction() -> None:
    """A state merged on top of the held one wins, a corrected version of the same resource
    included, even when the correction is dated earlier than the version it replaces."""
    first = _merged_at(None, T0, "a", reading("heart_rate", 70, at=T0, version="1"))
    corrected = _merged_at(
        first,
        T0 + timedelta(minutes=5),
        "b",
        reading("heart_rate", 75, at=T0 - timedelta(minutes=1), version="2"),
    )
    assert combine(first, corrected) is corrected
    assert combine(corrected, first).readings == corrected.readings


def test_combining_keeps_the_answered_orders_of_both_states() -> None:
    """Orders answered on either instance stay answered in the combined state."""
    base = _merged_at(None, T0, "a", reading("heart_rate", 70))
    one = base.model_copy(update={"fulfilled_orders": ("ServiceRequest/1",)})
    two = base.model_copy(
        update={"fulfilled_orders": ("ServiceRequest/2",), "updated_at": T0 + timedelta(seconds=1)}
    )
    assert set(combine(one, two).fulfilled_orders) == {"ServiceRequest/1", "ServiceRequest/2"}


def test_follower_forgets_states_not_updated_within_the_retention() -> None:
    """States last updated before now - MEDMESH_READINGS_RETENTION_HOURS are dropped, the
    others kept (memory follows the patients seen lately, not every patient ever seen)."""
    store = ReadingsStore()
    recent = _merged_at(None, T0, "a", reading("heart_rate", 70))
    stale = recent.model_copy(
        update={"patient_pseudonym": "pold", "updated_at": T0 - timedelta(hours=169)}
    )
    store.put(recent)
    store.put(stale)
    follower = ReadingsFollower(store, IngestSettings(readings_retention_hours=168))
    assert follower.forget_stale(now=T0) == 1
    assert store.get("pabc", "deterioration") is not None
    assert store.get("pold", "deterioration") is None


def test_a_retention_shorter_than_the_lookback_is_refused() -> None:
    """Forgetting states sooner than readings expire would lose readings still in the window."""
    with pytest.raises(ValidationError, match="RETENTION_HOURS must cover"):
        IngestSettings(readings_retention_hours=1, readings_lookback_minutes=240)


def test_a_state_merged_on_the_held_one_replaces_it_and_otherwise_is_combined() -> None:
    """put(state, based_on=held) stores the state itself; if another instance's state was
    taken in meanwhile, the two are combined so that neither's readings are lost."""
    store = ReadingsStore()
    base = _merged_at(None, T0, "a", reading("respiratory_rate", 16))
    store.put(base)
    mine = _merged_at(base, T0 + timedelta(seconds=1), "a", reading("spo2", 97))
    store.put(mine, based_on=base)
    assert store.get("pabc", "deterioration") is mine
    theirs = _merged_at(base, T0 + timedelta(seconds=1), "b", reading("heart_rate", 70))
    store.put(theirs)  # followed while "later" below was being merged on top of "mine"
    later = _merged_at(mine, T0 + timedelta(seconds=2), "a", reading("temperature", 37.0))
    store.put(later, based_on=mine)
    held = store.get("pabc", "deterioration")
    assert held is not None
    assert {r.name for r in held.readings} == {
        "respiratory_rate",
        "spo2",
        "heart_rate",
        "temperature",
    }


def test_a_state_merged_from_an_earlier_received_payload_is_still_the_later_state() -> None:
    """A correction received earlier (another instance's clock, or a poll prepared before an
    HTTP payload) but merged on top of a state is stamped no earlier than it, so every instance
    combining the two keeps the correction."""
    first = _merged_at(None, T0 + timedelta(seconds=5), "a", reading("heart_rate", 80))
    corrected = _merged_at(
        first, T0 + timedelta(seconds=1), "b", reading("heart_rate", 90, version="2")
    )
    assert corrected.updated_at == first.updated_at
    assert [r.value for r in combine(first, corrected).readings] == [90]
    assert [r.value for r in combine(corrected, first).readings] == [90]
