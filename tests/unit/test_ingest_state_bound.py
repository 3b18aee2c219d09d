"""The readings state's memory bound (MEDMESH_READINGS_MAX_BYTES, issue 16 item 5)."""

from __future__ import annotations

import asyncio
import tracemalloc
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import pytest
from pydantic import ValidationError

from medmesh_cli.bench.state_memory import measure
from medmesh_cli.devstack.paths import repo_root
from medmesh_contracts import topics
from medmesh_contracts.events import IngestedReading, PatientReadingsUpdated, Producer, to_wire
from medmesh_ingest.readings import ReadingsStore, state_bytes, state_key
from medmesh_ingest.settings import READINGS_MAX_BYTES, IngestSettings
from medmesh_ingest.state_topic import ReadingsFollower
from medmesh_runtime.metrics import configure_metrics, prometheus_text

T0 = datetime(2026, 11, 23, 8, 0, tzinfo=UTC)
PRODUCER = Producer(service="ingest", instance="test")


def state(
    pseudonym: str, minutes: int, *, samples: int = 0, model: str = "deterioration"
) -> PatientReadingsUpdated:
    """A patient's state updated ``minutes`` after T0, with one reading (a waveform when
    ``samples``)."""
    at = T0 + timedelta(minutes=minutes)
    return PatientReadingsUpdated(
        correlation_id=f"c-{pseudonym}",
        producer=PRODUCER,
        model=model,
        patient_pseudonym=pseudonym,
        subject_reference=f"Patient/{pseudonym}",
        readings=(
            IngestedReading(
                name="heart_rate",
                value=70.0,
                unit="/min",
                observed_at=at,
                source_reference=f"Observation/{pseudonym}",
                samples=tuple(float(i % 7) for i in range(samples)) if samples else None,
                period_ms=4.0 if samples else None,
            ),
        ),
        updated_at=at,
    )


def held(store: ReadingsStore) -> set[str]:
    """The pseudonyms whose state the store holds."""
    return {s.patient_pseudonym for s in store}


def test_without_a_bound_every_state_is_kept() -> None:
    """A store built without max_bytes (in-process tools) never evicts."""
    store = ReadingsStore()
    for i in range(50):
        store.put(state(f"p{i}", i))
    assert len(store) == 50
    assert store.evicted == 0


def test_reaching_the_bound_evicts_the_least_recently_updated_states_first() -> None:
    """Beyond max_bytes the states updated longest ago go first, whatever order they were
    stored in; the newer ones stay."""
    one = state_bytes(state("p0", 0))
    store = ReadingsStore(max_bytes=3 * one)
    for pseudonym, minutes in (("pa", 1), ("pb", 0), ("pc", 5)):
        store.put(state(pseudonym, minutes))
    assert held(store) == {"pa", "pb", "pc"}
    store.put(state("pd", 9))
    assert held(store) == {"pa", "pc", "pd"}
    store.put(state("pe", 7))
    assert held(store) == {"pc", "pd", "pe"}
    assert store.evicted == 2


def test_an_updated_state_is_no_longer_the_first_to_go() -> None:
    """A patient whose state is updated again moves behind the others in the eviction order."""
    one = state_bytes(state("p0", 0))
    store = ReadingsStore(max_bytes=2 * one)
    store.put(state("pa", 0))
    store.put(state("pb", 1))
    store.put(state("pa", 2))  # pa's newer state replaces its first one
    store.put(state("pc", 3))
    assert held(store) == {"pa", "pc"}


def test_the_store_never_holds_more_than_its_bound() -> None:
    """However many states of whatever size come, the estimate of what is held stays within
    max_bytes and equals the sum of the held states' estimates."""
    bound = 200_000
    store = ReadingsStore(max_bytes=bound)
    for i in range(300):
        store.put(state(f"p{i % 120}", i, samples=(i * 37) % 900))
        assert store.bytes <= bound
        assert store.bytes == sum(state_bytes(s) for s in store)
    assert store.evicted > 0


def test_a_state_alone_larger_than_the_bound_is_not_kept() -> None:
    """A waveform state larger than the whole bound is evicted at once, not held beyond it."""
    store = ReadingsStore(max_bytes=10_000)
    store.put(state("small", 0))
    store.put(state("huge", 1, samples=5000))
    assert store.bytes <= 10_000
    assert store.get("huge", "deterioration") is None


def test_an_evicted_patient_starts_afresh_and_forgets_its_written_offset() -> None:
    """Eviction drops the state and the note of this instance's write, so the follower reads
    that key's next record again."""
    one = state_bytes(state("p0", 0))
    store = ReadingsStore(max_bytes=one)
    store.put(state("pa", 0))
    store.written(state_key("pa", "deterioration"), 7)
    store.put(state("pb", 1))
    assert store.get("pa", "deterioration") is None
    assert not store.wrote(state_key("pa", "deterioration"), 7)


def test_forgetting_stale_states_frees_their_bytes() -> None:
    """States dropped by the retention no longer count towards the bound."""
    store = ReadingsStore(max_bytes=10_000_000)
    store.put(state("pa", 0))
    store.put(state("pb", 600))
    assert store.forget_older_than(T0 + timedelta(minutes=1)) == 1
    assert store.bytes == state_bytes(state("pb", 600))


def test_evictions_are_counted_in_the_metric_without_patient_data() -> None:
    """medmesh_ingest_readings_evicted_total grows by the states evicted and carries no
    pseudonym."""
    configure_metrics("test", "state-bound-test")

    def counted() -> float:
        lines = [
            line
            for line in prometheus_text().decode().splitlines()
            if line.startswith("medmesh_ingest_readings_evicted_total")
        ]
        assert all("pevicted" not in line for line in lines)
        return sum(float(line.rsplit(" ", 1)[1]) for line in lines)

    before = counted()
    one = state_bytes(state("pevicted0", 0))
    store = ReadingsStore(max_bytes=one)
    for i in range(4):
        store.put(state(f"pevicted{i}", i))
    assert counted() - before == 3


async def test_rebuilding_from_the_topic_respects_the_bound() -> None:
    """The follower's start reads every record into the store, which keeps under
    max_bytes and ends with the most recently updated patients, whatever the partitions'
    interleaving."""
    settings = IngestSettings(readings_max_bytes=16 * 1024 * 1024)
    one = state_bytes(state("p0000", 0, samples=2500, model="ecg-rhythm"))
    room = settings.readings_max_bytes // one
    states = [state(f"p{i:04}", i, samples=2500, model="ecg-rhythm") for i in range(room + 40)]
    # Two partitions read one after the other: the newer half's records come first.
    half = len(states) // 2
    records = [
        SimpleNamespace(
            topic=topics.INGEST_READINGS,
            key=state_key(s.patient_pseudonym, s.model).encode(),
            offset=n,
            value=to_wire(s),
        )
        for n, s in enumerate(states[half:] + states[:half])
    ]

    class OnePoll:
        async def getmany(self, timeout_ms: int) -> dict[str, list[SimpleNamespace]]:
            return {"medmesh.ingest.readings-0": records}

    store = ReadingsStore(max_bytes=settings.readings_max_bytes)
    follower = ReadingsFollower(store, settings)
    await follower._apply_next(OnePoll(), timeout_ms=0)
    assert follower.applied == len(states)
    assert store.bytes <= settings.readings_max_bytes
    assert held(store) == {s.patient_pseudonym for s in states[-len(store) :]}
    assert store.evicted == len(states) - len(store) >= 40


def test_the_bound_is_configured_with_a_measured_default_and_a_floor() -> None:
    """MEDMESH_READINGS_MAX_BYTES defaults to 128 MiB and refuses less than 16 MiB (a few
    states' worth would evict patients on every reading)."""
    assert IngestSettings().readings_max_bytes == READINGS_MAX_BYTES == 128 * 1024 * 1024
    with pytest.raises(ValidationError, match="readings_max_bytes"):
        IngestSettings(readings_max_bytes=1024 * 1024)


def test_the_estimate_covers_the_measured_memory_of_vitals_and_ecg_states() -> None:
    """The measurement script runs on a few patients per model, and the store's estimate is at
    or above what tracemalloc measures for both forms of a state."""
    tracemalloc.start()
    try:
        results = asyncio.run(measure(repo_root(), 30))
    finally:
        tracemalloc.stop()
    assert [r.model for r in results] == ["deterioration", "ecg-rhythm"]
    for result in results:
        assert result.estimated >= max(result.merged, result.rebuilt) > 0
    vitals, ecg = results
    assert ecg.estimated > 5 * vitals.estimated  # 2500 samples outweigh seven vital signs
