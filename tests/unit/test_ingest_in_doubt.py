"""Publishes that outlive ingest's timeout stay in doubt, so a sender's retry does not duplicate."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from medmesh_contracts.events import (
    PatientReadingsUpdated,
    Producer,
    RequestInference,
    SourceContext,
)
from medmesh_contracts.modelspec import load_specs
from medmesh_ingest.pseudonym import Pseudonymizer
from medmesh_ingest.readings import ReadingsStore
from medmesh_ingest.service import Context, IngestService, KafkaUnavailableError, Outgoing
from medmesh_ingest.validation import Limits

ROOT = Path(__file__).resolve().parents[2]
SPECS = load_specs(ROOT / "deploy" / "models")
BUNDLE = (ROOT / "tests" / "fixtures" / "fhir" / "vitals-bundle-high.json").read_bytes()
CONTEXT = Context(SourceContext(channel="http"))
RECEIVED = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


class SlowKafka:
    """Acknowledges nothing until ``back`` is set, then everything; can fail instead."""

    def __init__(self) -> None:
        self.back = asyncio.Event()
        self.fail = False
        self.requests: list[RequestInference] = []
        self.states: list[PatientReadingsUpdated] = []

    async def publish(
        self,
        outgoing: Sequence[Outgoing],
        states: Sequence[PatientReadingsUpdated],
        payloads: int,
    ) -> list[int | None]:
        await self.back.wait()
        if self.fail:
            raise ConnectionError("broker gone")
        self.requests.extend(item.request for item in outgoing)
        self.states.extend(states)
        return [None] * len(states)


def _service(kafka: SlowKafka) -> IngestService:
    return IngestService(
        specs=SPECS,
        pseudonymize=Pseudonymizer(b"0123456789abcdef0123"),
        producer=Producer(service="ingest", instance="test"),
        store=ReadingsStore(),
        publish=kafka.publish,
        limits=Limits(),
        lookback=timedelta(hours=4),
        publish_timeout_s=0.05,
    )


async def test_a_retry_after_a_timed_out_publish_is_not_sent_twice() -> None:
    """Timed out: 503 (KafkaUnavailableError), and 503 again while in doubt; once Kafka takes
    the first publish, the retry is recognised as already sent: one request in all."""
    kafka = SlowKafka()
    service = _service(kafka)
    with pytest.raises(KafkaUnavailableError, match="in time"):
        await service.handle(BUNDLE, CONTEXT, RECEIVED)
    with pytest.raises(KafkaUnavailableError, match="not yet acknowledged"):
        await service.handle(BUNDLE, CONTEXT, RECEIVED)
    kafka.back.set()
    await asyncio.sleep(0.01)  # the publish in doubt completes in the background
    answer = await service.handle(BUNDLE, CONTEXT, RECEIVED)
    assert answer.status == 200
    assert answer.requests == ()
    assert len(kafka.requests) == 1
    assert len(kafka.states) == 1


async def test_a_publish_in_doubt_that_fails_lets_the_retry_send_again() -> None:
    """If the publish in doubt fails after all, nothing was kept and the retry is sent."""
    kafka = SlowKafka()
    service = _service(kafka)
    with pytest.raises(KafkaUnavailableError):
        await service.handle(BUNDLE, CONTEXT, RECEIVED)
    kafka.fail = True
    kafka.back.set()
    await asyncio.sleep(0.01)
    kafka.fail = False
    answer = await service.handle(BUNDLE, CONTEXT, RECEIVED)
    assert answer.status == 202
    assert len(kafka.requests) == 1
