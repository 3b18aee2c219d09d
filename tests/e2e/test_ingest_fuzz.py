"""Property-based fuzzing of ingest's two front doors on the real stack (hypothesis).

HTTP: every generated input is answered 2xx or 4xx with an OperationOutcome, never 5xx, and
ingest keeps running. Inbound topic: every event ingest rejects is on medmesh.fhir.invalid, and
no accepted event is. Together at least 10,000 inputs (FUZZ_HTTP_EXAMPLES + FUZZ_KAFKA_EVENTS).
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import httpx
from aiokafka import AIOKafkaProducer
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from medmesh_cli.devstack.stack import Stack
from medmesh_contracts import topics
from medmesh_contracts.modelspec import load_specs
from medmesh_ingest.extraction import extract
from medmesh_ingest.outcomes import FhirRejected
from medmesh_ingest.validation import parse
from tests.e2e.conftest import TopicTap
from tests.unit.test_ingest_fuzz import CONTENT_TYPES, payloads

FUZZ_HTTP_EXAMPLES = 8_000
FUZZ_KAFKA_EVENTS = 2_000
SPECS = load_specs(Path(__file__).resolve().parents[2] / "deploy" / "models")


def _generate(strategy: st.SearchStrategy[Any], count: int) -> list[Any]:
    """``count`` inputs drawn by hypothesis (generation only: they are sent in bulk after)."""
    drawn: list[Any] = []

    @settings(
        max_examples=count,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def collect(example: Any) -> None:
        drawn.append(example)

    collect()
    return drawn


async def test_http_fuzz_never_gets_5xx(stack: Stack) -> None:
    """Thousands of generated inputs over HTTP all get 2xx/4xx with an OperationOutcome, or,
    for an accepted batch or transaction, a 200 with its response Bundle."""
    generated = _generate(
        st.tuples(
            payloads,
            st.sampled_from(CONTENT_TYPES),
            st.sampled_from(["/fhir", "/fhir/Observation", "/fhir/Bundle"]),
        ),
        FUZZ_HTTP_EXAMPLES,
    )
    failures: list[tuple[int, bytes]] = []
    gate = asyncio.Semaphore(8)
    async with httpx.AsyncClient(base_url=stack.config.ingest_url, timeout=60) as client:

        async def post(body: bytes, content_type: str, path: str) -> None:
            async with gate:
                response = await client.post(
                    path, content=body, headers={"content-type": content_type}
                )
            if response.status_code >= 500 or not _is_outcome(response):
                failures.append((response.status_code, body[:300]))

        await asyncio.gather(*(post(*example) for example in generated))
        ready = await client.get("/readyz")
    assert len(generated) >= FUZZ_HTTP_EXAMPLES * 0.95  # hypothesis may stop a little early
    assert failures == []
    assert ready.status_code == 204
    assert stack.services["ingest"].running()


def _is_outcome(response: httpx.Response) -> bool:
    """An OperationOutcome, or a 200 with a batch-response / transaction-response Bundle."""
    try:
        answer = response.json()
        if answer["resourceType"] == "OperationOutcome":
            return True
        return bool(
            response.status_code == httpx.codes.OK
            and answer["resourceType"] == "Bundle"
            and answer["type"] in ("batch-response", "transaction-response")
        )
    except (ValueError, KeyError, TypeError):
        return False


def _rejected_locally(raw: bytes) -> bool:
    """Whether ingest must reject an inbound event: the same checks it runs, run here."""
    try:
        payload = parse(raw)
    except FhirRejected:
        return True
    return bool(extract(payload.resources, SPECS).rejections)


async def test_inbound_fuzz_rejections_are_all_dead_lettered(
    stack: Stack, tap: TopicTap, producer: AIOKafkaProducer
) -> None:
    """Every generated inbound event ingest rejects is on medmesh.fhir.invalid, and only those."""
    generated: list[bytes] = _generate(payloads, FUZZ_KAFKA_EVENTS)
    run = uuid.uuid4().hex.encode()  # one key: one partition, so the sentinel comes last
    sent: dict[int, bytes] = {}
    futures = [await producer.send(topics.FHIR_INBOUND, body, key=run) for body in generated]
    for body, future in zip(generated, futures, strict=True):
        sent[(await future).offset] = body
    sentinel = b"fuzz sentinel " + run
    await producer.send_and_wait(topics.FHIR_INBOUND, sentinel, key=run)
    await tap.wait_for(
        topics.FHIR_INVALID, lambda r: r.json()["raw_value"] == sentinel.decode(), timeout_s=90
    )
    partition = (await futures[0]).partition
    dead = {
        r.json()["source_offset"]
        for r in tap.matching(topics.FHIR_INVALID, lambda r: r.key == run)
        if r.json()["source_partition"] == partition
    }
    expected = {offset for offset, body in sent.items() if _rejected_locally(body)}
    assert len(sent) >= FUZZ_KAFKA_EVENTS * 0.95
    assert expected, "the generator produced no invalid event"
    assert dead & set(sent) == expected
    assert stack.services["ingest"].running()
