"""Report delivery to a FHIR server (tests/fhir_receiver.py): once, with backoff, or undeliverable."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from medmesh_contracts import topics
from medmesh_contracts.events import DeliverReport, Producer, ReportUndeliverable, to_wire
from medmesh_contracts.modelspec import ModelSpec, load_spec
from medmesh_reporting.delivery import (
    Delivered,
    Deliverer,
    DeliveryBackoff,
    DeliveryLoop,
    Refused,
    transaction_bundle,
)
from medmesh_reporting.report import build_report
from tests.delivery_clients import DeliveryConsumer, DeliveryRecord, SentEvents
from tests.factories import make_completed, make_request, make_task
from tests.fhir_receiver import FhirTestServer
from tests.service.conftest import SPECS_DIR

BASE = "https://fhir.hospital.test/r4"
ISSUED = datetime(2026, 11, 23, 8, 31, tzinfo=UTC)
NO_WAIT = DeliveryBackoff(initial_s=0.01, max_s=0.05, give_up_after_s=5.0)


@pytest.fixture(scope="module")
def spec() -> ModelSpec:
    """The deterioration model's spec, as deployed."""
    return load_spec(SPECS_DIR / "deterioration.yaml")


def _report(spec: ModelSpec, correlation_id: str = "req-1") -> dict[str, Any]:
    completed = make_completed(make_task(make_request(correlation_id=correlation_id)))
    return build_report(completed, spec, issued=ISSUED)


def _deliverer(
    server: FhirTestServer, backoff: DeliveryBackoff = NO_WAIT, token: str | None = None
) -> Deliverer:
    client = httpx.AsyncClient(transport=httpx.MockTransport(server))

    async def no_sleep(_seconds: float) -> None:
        return None

    return Deliverer(client, BASE, token=token, backoff=backoff, sleep=no_sleep)


def test_transaction_creates_conditionally_on_identifiers(spec: ModelSpec) -> None:
    """Report, Observation and Device are conditional creates; Provenance a PUT to its id."""
    bundle = transaction_bundle(_report(spec))

    assert bundle["type"] == "transaction"
    requests = {e["resource"]["resourceType"]: e["request"] for e in bundle["entry"]}
    assert requests["DiagnosticReport"] == {
        "method": "POST",
        "url": "DiagnosticReport",
        "ifNoneExist": "identifier=https://medmesh.dev/fhir/sid/report|req-1",
    }
    assert requests["Observation"]["ifNoneExist"].endswith("report-observation|req-1")
    assert requests["Device"]["ifNoneExist"].endswith("sid/model|deterioration/v1")
    provenance_id = next(
        e["resource"]["id"] for e in bundle["entry"] if e["request"]["method"] == "PUT"
    )
    assert requests["Provenance"] == {"method": "PUT", "url": f"Provenance/{provenance_id}"}


async def test_server_down_then_up_gets_the_report_exactly_once(spec: ModelSpec) -> None:
    """Three 503s, then success: one delivery after four attempts, one of each resource."""
    server = FhirTestServer(down_for=3)

    outcome = await _deliverer(server).deliver(_report(spec))

    assert outcome == Delivered(200, 4)
    assert [len(server.of_type(k)) for k in ("DiagnosticReport", "Observation", "Device")] == [
        1,
        1,
        1,
    ]
    (report,) = server.of_type("DiagnosticReport")
    (observation,) = server.of_type("Observation")
    assert report["result"] == [{"reference": f"Observation/{observation['id']}"}]


async def test_connection_errors_are_retried(spec: ModelSpec) -> None:
    """Refused connections are retried like 503s."""
    server = FhirTestServer(down_for=2, down_as_connection_error=True)

    outcome = await _deliverer(server).deliver(_report(spec))

    assert outcome == Delivered(200, 3)


async def test_sending_a_report_again_creates_nothing_new(spec: ModelSpec) -> None:
    """A retried delivery (response lost) matches the existing resources instead of duplicating."""
    server = FhirTestServer()
    deliverer = _deliverer(server)

    await deliverer.deliver(_report(spec))
    await deliverer.deliver(_report(spec))
    await deliverer.deliver(_report(spec, "req-2"))

    assert len(server.of_type("DiagnosticReport")) == 2
    assert len(server.of_type("Observation")) == 2
    assert len(server.of_type("Provenance")) == 2
    assert len(server.of_type("Device")) == 1  # one model version: one Device


async def test_rejected_report_is_refused_with_the_operation_outcome(spec: ModelSpec) -> None:
    """A 422 is final: no retry, and the server's OperationOutcome is kept."""
    server = FhirTestServer(reject_when=lambda _bundle: "subject Patient/example-1 is unknown")

    outcome = await _deliverer(server).deliver(_report(spec))

    assert isinstance(outcome, Refused)
    assert (outcome.status_code, outcome.attempts) == (422, 1)
    assert outcome.operation_outcome is not None
    assert "unknown" in outcome.operation_outcome["issue"][0]["diagnostics"]
    assert server.requests == 1


async def test_a_server_that_stays_down_is_given_up_on(spec: ModelSpec) -> None:
    """When the backoff runs out, the report is refused with the last problem."""
    server = FhirTestServer(down_for=10_000)
    backoff = DeliveryBackoff(initial_s=1.0, max_s=1.0, give_up_after_s=0.0)

    outcome = await _deliverer(server, backoff).deliver(_report(spec))

    assert isinstance(outcome, Refused)
    assert outcome.reason == "gave up after 1 attempts: the FHIR server answered 503"


async def test_token_is_sent_as_bearer(spec: ModelSpec) -> None:
    """A configured token goes in the Authorization header, with FHIR JSON content type."""
    seen: list[httpx.Request] = []
    server = FhirTestServer()

    def record(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return server(request)

    client = httpx.AsyncClient(transport=httpx.MockTransport(record))
    token = "test-token"  # noqa: S105 -- a fake, for the header check
    await Deliverer(client, BASE, token=token).deliver(_report(spec))

    assert seen[0].headers["authorization"] == f"Bearer {token}"
    assert seen[0].headers["content-type"] == "application/fhir+json"
    assert str(seen[0].url) == BASE


async def test_loop_delivers_or_records_undeliverable_then_commits(spec: ModelSpec) -> None:
    """One report delivered, one refused (to the undeliverable topic); both offsets committed."""
    server = FhirTestServer(
        reject_when=lambda b: "rejected" if "req-bad" in json.dumps(b) else None
    )
    consumer, kafka = DeliveryConsumer([]), SentEvents()
    consumer.records = [
        DeliveryRecord(0, json.dumps(_report(spec, "req-good")).encode(), "req-good"),
        DeliveryRecord(1, json.dumps(_report(spec, "req-bad")).encode(), "req-bad"),
    ]
    loop = DeliveryLoop(
        lambda: (consumer, kafka), _deliverer(server), Producer(service="reporting", instance="t")
    )

    assert await loop.process_batch(consumer, kafka) == 2

    assert consumer.commits == [1, 2]
    assert (loop.delivered, loop.undeliverable) == (1, 1)
    ((topic, value),) = kafka.sent
    assert topic == topics.REPORTS_UNDELIVERABLE
    event = ReportUndeliverable.model_validate_json(value)
    assert event.correlation_id == "req-bad"
    assert event.status_code == 422
    assert event.operation_outcome is not None
    assert event.fhir_server == BASE
    assert event.report["identifier"]["value"] == "req-bad"


async def test_a_report_the_deliverer_cannot_handle_is_refused_and_the_next_delivered(
    spec: ModelSpec,
) -> None:
    """A report whose delivery raises (JSON, but not a report Bundle) is retried, then recorded
    as undeliverable with the error kind; the report after it is delivered, both committed."""
    server = FhirTestServer()
    consumer, kafka = DeliveryConsumer([]), SentEvents()
    consumer.records = [
        DeliveryRecord(0, b'{"resourceType": "Bundle", "entry": "not a list"}', "req-odd"),
        DeliveryRecord(1, json.dumps(_report(spec, "req-good")).encode(), "req-good"),
    ]
    loop = DeliveryLoop(
        lambda: (consumer, kafka), _deliverer(server), Producer(service="reporting", instance="t")
    )
    loop.retry_backoff_s = 0

    assert await loop.process_batch(consumer, kafka) == 2

    assert consumer.commits == [1, 2]
    assert (loop.delivered, loop.undeliverable) == (1, 1)
    ((_topic, value),) = kafka.sent
    event = ReportUndeliverable.model_validate_json(value)
    assert event.correlation_id == "req-odd"
    assert "delivering raised 3 times" in event.reason


async def test_a_delivery_request_delivers_its_report_once_however_often_it_is_sent(
    spec: ModelSpec,
) -> None:
    """A DeliverReport command (a replayed undeliverable report) is delivered like a report;
    sent twice, the server still holds one copy, and nothing is published but the commits."""
    server = FhirTestServer()
    consumer, kafka = DeliveryConsumer([]), SentEvents()
    command = DeliverReport(
        correlation_id="req-again",
        producer=Producer(service="cli", instance="t"),
        report=_report(spec, "req-again"),
        replay_of=f"{topics.REPORTS_UNDELIVERABLE}/0/4",
    )
    requests = topics.REPORTS_DELIVERY_REQUESTS
    consumer.records = [
        DeliveryRecord(offset, to_wire(command), "req-again", requests) for offset in (0, 1)
    ]
    loop = DeliveryLoop(
        lambda: (consumer, kafka), _deliverer(server), Producer(service="reporting", instance="t")
    )

    assert await loop.process_batch(consumer, kafka) == 2

    assert (loop.delivered, loop.undeliverable) == (2, 0)
    assert kafka.sent == []
    assert len(server.of_type("DiagnosticReport")) == 1


async def test_a_delivery_request_that_is_no_command_is_undeliverable_without_its_values(
    spec: ModelSpec,
) -> None:
    """A record on the delivery-request topic that is not a DeliverReport is recorded as
    undeliverable, naming the invalid fields but quoting none of its values."""
    consumer, kafka = DeliveryConsumer([]), SentEvents()
    consumer.records = [
        DeliveryRecord(
            0, b'{"report": "Jane Doe 1970-01-01"}', "req-x", topics.REPORTS_DELIVERY_REQUESTS
        )
    ]
    loop = DeliveryLoop(
        lambda: (consumer, kafka),
        _deliverer(FhirTestServer()),
        Producer(service="reporting", instance="t"),
    )

    assert await loop.process_batch(consumer, kafka) == 1

    ((topic, value),) = kafka.sent
    assert topic == topics.REPORTS_UNDELIVERABLE
    event = ReportUndeliverable.model_validate_json(value)
    assert event.reason.startswith("not a DeliverReport command: ValidationError: ")
    assert "report" in event.reason
    assert "Jane" not in event.reason
