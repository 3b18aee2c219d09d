"""Reports to an R4 source: published as fhir.R4+json and delivered with fhirVersion=4.0."""

from __future__ import annotations

import json

import httpx
import pytest

from medmesh_cli.ops.dlq import replay_of
from medmesh_contracts import headers as h
from medmesh_contracts import topics
from medmesh_contracts.events import (
    DeliverReport,
    FhirVersion,
    InferenceCompleted,
    Producer,
    ReportUndeliverable,
    SourceContext,
    to_wire,
)
from medmesh_contracts.modelspec import ModelSpec, load_spec
from medmesh_reporting.delivery import Deliverer, DeliveryLoop
from medmesh_reporting.report import build_report, validate_report
from tests.conformance.report_checks import check_report_bundle
from tests.delivery_clients import DeliveryConsumer, DeliveryRecord, SentEvents
from tests.factories import make_completed, make_request, make_task
from tests.fhir_receiver import FhirTestServer
from tests.service.conftest import SPECS_DIR
from tests.service.test_reporting_app import _header, _loop, _reports
from tests.service.test_reporting_delivery import ISSUED
from tests.transactional_kafka import FakeKafka, run_until

BASE = "https://fhir.hospital.test/r4"
PRODUCER = Producer(service="reporting", instance="t")


@pytest.fixture(scope="module")
def spec() -> ModelSpec:
    """The deterioration model's spec."""
    return load_spec(SPECS_DIR / "deterioration.yaml")


def _completed(fhir_version: FhirVersion, correlation_id: str = "req-r4") -> InferenceCompleted:
    source = SourceContext(channel="http", fhir_version=fhir_version, site="ward")
    request = make_request(correlation_id=correlation_id).model_copy(update={"source": source})
    return make_completed(make_task(request))


async def _deliver(
    records: list[DeliveryRecord], server: FhirTestServer
) -> tuple[list[str], SentEvents]:
    """Run the delivery loop over ``records``; the content types the server was sent."""
    seen: list[httpx.Request] = []

    def record(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return server(request)

    client = httpx.AsyncClient(transport=httpx.MockTransport(record))
    consumer, kafka = DeliveryConsumer(records), SentEvents()
    loop = DeliveryLoop(lambda: (consumer, kafka), Deliverer(client, BASE), PRODUCER)
    await loop.process_batch(consumer, kafka)
    return [r.headers["content-type"] for r in seen], kafka


async def test_the_report_of_an_r4_source_is_labelled_r4() -> None:
    """A result of an R4 source becomes a conformant R4 report with the fhir.R4+json header."""
    kafka = FakeKafka()
    kafka.append(topics.INFERENCE_RESULTS, to_wire(_completed("R4")))

    await run_until(_loop(kafka), lambda: _reports(kafka))

    (report,) = _reports(kafka)
    bundle = json.loads(report.value or b"")
    assert _header(report, h.SCHEMA) == h.FHIR_R4_JSON
    assert check_report_bundle(bundle, fhir_version="R4") == []
    validate_report(bundle, "R4")


@pytest.mark.parametrize(
    ("schema", "content_type"),
    [
        (h.FHIR_R4_JSON, "application/fhir+json; fhirVersion=4.0"),
        (h.FHIR_R4B_JSON, "application/fhir+json; fhirVersion=4.3"),
        (h.FHIR_R5_JSON, "application/fhir+json; fhirVersion=5.0"),
        (None, "application/fhir+json"),
    ],
)
async def test_a_report_is_delivered_in_the_version_its_header_names(
    spec: ModelSpec, schema: str | None, content_type: str
) -> None:
    """The transaction's content type names the FHIR version of the report record's schema
    header (fhirVersion=4.0 for R4); a record without one is sent without it."""
    report = build_report(_completed("R4"), spec, issued=ISSUED)
    record = DeliveryRecord(
        0, json.dumps(report).encode(), "req-r4", topics.REPORTS_DIAGNOSTIC, schema
    )

    content_types, kafka = await _deliver([record], FhirTestServer())

    assert content_types == [content_type]
    assert kafka.sent == []


async def test_a_refused_r4_report_is_replayed_as_r4(spec: ModelSpec) -> None:
    """A refused R4 report's undeliverable event says R4, its replay command carries R4, and
    the command is delivered with fhirVersion=4.0."""
    report = build_report(_completed("R4"), spec, issued=ISSUED)
    record = DeliveryRecord(
        0, json.dumps(report).encode(), "req-r4", topics.REPORTS_DIAGNOSTIC, h.FHIR_R4_JSON
    )
    _, kafka = await _deliver([record], FhirTestServer(reject_when=lambda _b: "refused"))
    ((topic, value),) = kafka.sent
    event = ReportUndeliverable.model_validate_json(value)
    assert topic == topics.REPORTS_UNDELIVERABLE
    assert event.fhir_version == "R4"

    replay = replay_of(json.loads(value), b"pseudo", f"{topics.REPORTS_UNDELIVERABLE}/0/0")
    command = DeliverReport.model_validate_json(replay.value)
    assert command.fhir_version == "R4"
    requests = topics.REPORTS_DELIVERY_REQUESTS
    content_types, _ = await _deliver(
        [DeliveryRecord(0, replay.value, "req-r4", requests, None)], FhirTestServer()
    )
    assert content_types == ["application/fhir+json; fhirVersion=4.0"]
