"""Ingest's points of composition (create_app's publish_requests, on_start, on_stop), as the
monolith uses them, on the in-memory broker."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import httpx
from faststream.kafka import KafkaBroker, TestKafkaBroker

from medmesh_contracts import topics
from medmesh_ingest.app import create_app
from medmesh_ingest.parts import Ingest
from medmesh_ingest.service import Outgoing
from tests.service.conftest import FIXTURES
from tests.service.test_ingest_app import GROUP, Captured, Harness, settings
from tests.transactional_kafka import FakeKafka


class Composed:
    """What the hooks saw: the handed-over requests and the ingest state at each hook."""

    def __init__(self) -> None:
        self.handed: list[Outgoing] = []
        self.events: list[str] = []
        self.ingest: Ingest | None = None

    async def publish_requests(self, outgoing: Sequence[Outgoing]) -> None:
        """Take the requests, as the monolith's pipeline does."""
        self.handed.extend(outgoing)

    async def on_start(self) -> None:
        """Note whether ingest already took payloads."""
        assert self.ingest is not None
        self.events.append(f"start (ingest ready: {self.ingest.ready})")

    async def on_stop(self) -> None:
        """Note whether ingest still took payloads."""
        assert self.ingest is not None
        self.events.append(f"stop (ingest ready: {self.ingest.ready})")


@asynccontextmanager
async def composed(hooks: Composed) -> AsyncIterator[Harness]:
    """Ingest's app built with the hooks, started, on an in-memory transactional Kafka."""
    kafka = FakeKafka()
    app = create_app(
        settings(),
        clients=kafka.clients(GROUP),
        publish_requests=hooks.publish_requests,
        on_start=hooks.on_start,
        on_stop=hooks.on_stop,
    )
    hooks.ingest = app.state.ingest
    broker: KafkaBroker = app.state.broker
    async with TestKafkaBroker(broker):
        stop_broker = broker.stop

        async def stop(*args: Any) -> None:
            hooks.events.append("broker stopped")
            await stop_broker(*args)

        broker.stop = stop  # type: ignore[method-assign,assignment]
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://ingest") as client:
                yield Harness(client, kafka, Captured(kafka), app.state.ingest, {})


async def test_http_requests_are_handed_over_and_the_states_still_commit() -> None:
    """With publish_requests, an HTTP payload's request goes to it, not to Kafka; its patient
    state is still committed to medmesh.ingest.readings."""
    hooks = Composed()
    async with composed(hooks) as harness:
        response = await harness.client.post(
            "/fhir",
            content=(FIXTURES / "vitals-bundle-high.json").read_bytes(),
            headers={"content-type": "application/fhir+json"},
        )
        assert response.status_code == 202
        assert [o.request.correlation_id for o in hooks.handed] == [
            response.headers["medmesh-correlation-id"]
        ]
        assert harness.captured.requests == []
        assert len(harness.captured.states) == 1


async def test_inbound_requests_are_handed_over_and_the_poll_commits() -> None:
    """With publish_requests, an inbound event's request goes to it; the states and the
    inbound offset commit, and nothing is produced to medmesh.inference.requests."""
    hooks = Composed()
    async with composed(hooks) as harness:
        await harness.inbound((FIXTURES / "vitals-bundle-medium.json").read_bytes())
        assert len(hooks.handed) == 1
        assert hooks.handed[0].request.source.channel == "kafka"
        assert harness.captured.requests == []
        assert harness.captured.states
        assert harness.kafka.offset(GROUP, topics.FHIR_INBOUND) == 1


async def test_on_start_runs_before_ingest_takes_payloads_and_on_stop_after() -> None:
    """on_start is awaited before ingest is ready; on_stop once it stopped taking payloads and
    before its broker (which the monolith's edge publishers use) stops."""
    hooks = Composed()
    async with composed(hooks) as harness:
        assert harness.ingest.ready
        assert hooks.events == ["start (ingest ready: False)"]
    # The first stop is the lifespan's (the in-memory broker stops it again on leaving).
    assert hooks.events[:3] == [
        "start (ingest ready: False)",
        "stop (ingest ready: False)",
        "broker stopped",
    ]
