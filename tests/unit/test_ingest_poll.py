"""A poll's payloads are merged in order and published together: requests and states in one
transaction."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from medmesh_contracts.events import PatientReadingsUpdated, Producer, SourceContext
from medmesh_contracts.modelspec import load_specs
from medmesh_ingest.pseudonym import Pseudonymizer
from medmesh_ingest.readings import ReadingsStore
from medmesh_ingest.service import (
    Context,
    IngestService,
    KafkaUnavailableError,
    Outgoing,
    Prepared,
)
from medmesh_ingest.validation import Limits

ROOT = Path(__file__).resolve().parents[2]
SPECS = load_specs(ROOT / "deploy" / "models")
ONE_BY_ONE = ROOT / "tests" / "fixtures" / "fhir" / "one-by-one"
READINGS = ["rr", "spo2", "o2-flow", "temp", "bp", "hr", "acvpu"]
CONTEXT = Context(SourceContext(channel="kafka"))
RECEIVED = datetime(2026, 11, 24, 9, 0, tzinfo=UTC)


def _reading(name: str, patient: str) -> bytes:
    observation = json.loads((ONE_BY_ONE / f"{name}.json").read_text())
    observation["subject"] = {"reference": f"Patient/{patient}"}
    observation["id"] = f"{patient}-{name}"
    return json.dumps(observation).encode()


class RecordingKafka:
    """Records every transaction (its requests and states), in order; commits at once, except
    that transactions made while ``stalled`` wait until ``released``."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []
        self.requests: list[Outgoing] = []
        self.states: list[PatientReadingsUpdated] = []
        self.stalled = False
        self.released = asyncio.Event()
        # Pseudonyms whose requests make the broker refuse the whole transaction.
        self.refused: set[str] = set()

    async def publish(
        self,
        outgoing: Sequence[Outgoing],
        states: Sequence[PatientReadingsUpdated],
        payloads: int,
    ) -> list[int | None]:
        if self.stalled:
            await self.released.wait()
        if any(o.request.patient_pseudonym in self.refused for o in outgoing):
            raise ConnectionError("refused")
        self.calls.append((len(outgoing), len(states)))
        self.requests.extend(outgoing)
        self.states.extend(states)
        return [None] * len(states)


def _service(kafka: RecordingKafka, store: ReadingsStore | None = None) -> IngestService:
    return IngestService(
        specs=SPECS,
        pseudonymize=Pseudonymizer(b"0123456789abcdef0123"),
        producer=Producer(service="ingest", instance="test"),
        store=ReadingsStore() if store is None else store,
        publish=kafka.publish,
        limits=Limits(),
        lookback=timedelta(hours=4),
        publish_timeout_s=0.05,
    )


async def _prepared(service: IngestService, payloads: Sequence[bytes]) -> list[Prepared]:
    prepared = [await service.prepare(p, CONTEXT, RECEIVED) for p in payloads]
    assert all(isinstance(p, Prepared) for p in prepared)
    return [p for p in prepared if isinstance(p, Prepared)]


async def test_one_patients_readings_in_one_poll_merge_in_order_into_one_request() -> None:
    """Seven single readings of one patient in one poll: six incomplete answers, then one 202,
    one transaction of one request and the patient's final state."""
    kafka = RecordingKafka()
    service = _service(kafka)
    poll = await _prepared(service, [_reading(name, "poll-a") for name in READINGS])
    answers = await service.apply(poll)
    assert [a.status for a in answers] == [200] * 6 + [202]
    assert kafka.calls == [(1, 1)]
    assert {r.name for r in kafka.states[0].readings} >= {"respiratory_rate", "heart_rate"}
    assert kafka.requests[0].request.correlation_id == answers[-1].requests[0].correlation_id


async def test_a_poll_of_two_patients_publishes_each_once_and_keeps_both_states() -> None:
    """Two patients interleaved in one poll: two requests, two states, both kept in the store."""
    kafka = RecordingKafka()
    store = ReadingsStore()
    service = _service(kafka, store)
    payloads = [_reading(name, patient) for name in READINGS for patient in ("poll-b", "poll-c")]
    answers = await service.apply(await _prepared(service, payloads))
    assert sum(len(a.requests) for a in answers) == 2
    assert kafka.calls == [(2, 2)]
    assert len(store) == 2


async def test_a_poll_stops_before_a_patient_in_doubt_after_publishing_the_rest() -> None:
    """A payload of a patient whose publish is in doubt stops the poll there: the payloads
    before it are published and kept, then KafkaUnavailableError (the poll is redelivered)."""
    kafka = RecordingKafka()
    service = _service(kafka)
    kafka.stalled = True
    with pytest.raises(KafkaUnavailableError, match="in time"):
        await service.apply(await _prepared(service, [_reading(n, "poll-d") for n in READINGS]))
    kafka.stalled = False  # poll-d's publish stays in doubt; later ones are acknowledged
    before = await _prepared(service, [_reading(n, "poll-e") for n in READINGS])
    in_doubt = await _prepared(service, [_reading("rr", "poll-d")])
    with pytest.raises(KafkaUnavailableError, match="not yet acknowledged"):
        await service.apply([*before, *in_doubt])
    assert kafka.calls == [(1, 1)]  # poll-e's, before the error
    answer = await service.handle(_reading("rr", "poll-e"), CONTEXT, RECEIVED)
    assert answer.requests == ()  # poll-e's state was kept: nothing new to send
    kafka.released.set()
    await asyncio.sleep(0.01)
    assert kafka.calls[-1:] == [(1, 1)]  # poll-d's, once back


async def test_a_refused_transaction_keeps_no_state_and_the_redelivered_poll_sends_all() -> None:
    """The transaction of a poll refused: the error is raised, no patient's state is kept,
    and the redelivered poll sends every patient's request again (none was committed)."""
    kafka = RecordingKafka()
    service = _service(kafka)
    payloads = [_reading(name, patient) for name in READINGS for patient in ("poll-f", "poll-g")]
    poll = await _prepared(service, payloads)
    kafka.refused.add(poll[0].groups[0].pseudonym)  # poll-f's
    with pytest.raises(KafkaUnavailableError, match="ConnectionError"):
        await service.apply(poll)
    assert kafka.states == []
    kafka.refused.clear()
    answers = await service.apply(await _prepared(service, payloads))
    assert len(kafka.requests) == 2
    assert sum(len(a.requests) for a in answers) == 2
