"""The reporting app on the in-memory broker: results in, report Bundles or dead letters out."""

from __future__ import annotations

import json

from faststream.kafka import KafkaBroker, TestKafkaBroker
from faststream.kafka.annotations import KafkaMessage

from medmesh_contracts import headers as h
from medmesh_contracts import topics
from medmesh_contracts.events import to_wire
from medmesh_reporting.app import create_app
from medmesh_reporting.conformance import check_report_bundle
from medmesh_reporting.settings import ReportingSettings
from tests.factories import make_completed
from tests.service.conftest import SPECS_DIR


def _broker() -> KafkaBroker:
    broker = create_app(ReportingSettings(model_specs_dir=SPECS_DIR)).broker
    assert isinstance(broker, KafkaBroker)
    return broker


async def test_result_becomes_one_conformant_report_with_headers() -> None:
    """An InferenceCompleted becomes a conformant Bundle with the correlation id header."""
    broker = _broker()
    reports: list[tuple[bytes, dict[str, str]]] = []

    @broker.subscriber(topics.REPORTS_DIAGNOSTIC)
    async def capture(message: KafkaMessage) -> None:
        reports.append((message.body, dict(message.headers)))

    completed = make_completed()
    async with TestKafkaBroker(broker) as test_broker:
        await test_broker.publish(to_wire(completed), topic=topics.INFERENCE_RESULTS)
    assert len(reports) == 1
    body, headers = reports[0]
    bundle = json.loads(body)
    assert check_report_bundle(bundle) == []
    assert headers[h.CORRELATION_ID] == completed.correlation_id
    assert headers[h.SCHEMA] == h.FHIR_R4B_JSON


async def test_redelivered_result_gives_the_identical_report() -> None:
    """The same result delivered twice produces byte-identical reports (idempotent ids, times)."""
    broker = _broker()
    reports: list[bytes] = []

    @broker.subscriber(topics.REPORTS_DIAGNOSTIC)
    async def capture(message: KafkaMessage) -> None:
        reports.append(message.body)

    wire = to_wire(make_completed())
    async with TestKafkaBroker(broker) as test_broker:
        await test_broker.publish(wire, topic=topics.INFERENCE_RESULTS)
        await test_broker.publish(wire, topic=topics.INFERENCE_RESULTS)
    assert len(reports) == 2
    assert reports[0] == reports[1]


async def test_result_with_an_impossible_band_is_dead_lettered() -> None:
    """A result whose band index the spec does not know goes to the reporting dead-letter topic."""
    broker = _broker()
    dead: list[bytes] = []

    @broker.subscriber(topics.REPORTING_DEADLETTER)
    async def capture(message: KafkaMessage) -> None:
        dead.append(message.body)

    completed = make_completed(
        outputs={"SCORE": [7.0], "RISK_BAND": [9.0], "CONTRIBUTIONS": [0.0] * 7}
    )
    async with TestKafkaBroker(broker) as test_broker:
        await test_broker.publish(to_wire(completed), topic=topics.INFERENCE_RESULTS)
    assert len(dead) == 1
    assert "ReportBuildError" in json.loads(dead[0])["reason"]
