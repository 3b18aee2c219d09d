"""The ingest app on the in-memory broker: HTTP answers and what reaches Kafka."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from faststream.kafka import KafkaBroker, TestKafkaBroker
from faststream.kafka.annotations import KafkaMessage
from fhir.resources.capabilitystatement import CapabilityStatement as R5CapabilityStatement
from fhir.resources.R4B.capabilitystatement import CapabilityStatement as R4BCapabilityStatement

from medmesh_contracts import headers as h
from medmesh_contracts import topics
from medmesh_contracts.events import RequestInference
from medmesh_ingest.app import create_app
from medmesh_ingest.parts import Ingest
from medmesh_ingest.settings import IngestSettings
from medmesh_runtime.metrics import prometheus_text
from tests.service.conftest import FIXTURES, SPECS_DIR
from tests.transactional_kafka import FakeKafka
from tests.unit.test_ingest_bundle_response import response_problems

GROUP = "medmesh-ingest"


class Captured:
    """Values committed to the topics ingest writes (what a read_committed consumer sees)."""

    def __init__(self, kafka: FakeKafka) -> None:
        self._kafka = kafka

    @property
    def requests(self) -> list[bytes]:
        """medmesh.inference.requests."""
        return self._kafka.values(topics.INFERENCE_REQUESTS)

    @property
    def invalid(self) -> list[bytes]:
        """medmesh.fhir.invalid."""
        return self._kafka.values(topics.FHIR_INVALID)

    @property
    def states(self) -> list[bytes]:
        """medmesh.ingest.readings."""
        return self._kafka.values(topics.INGEST_READINGS)


@dataclass
class Harness:
    """An HTTP client on the running ingest app and the in-memory Kafka behind it."""

    client: httpx.AsyncClient
    kafka: FakeKafka
    captured: Captured
    ingest: Ingest
    # What ingest published (not in transactions) to the topics ``running`` was asked to observe.
    published: dict[str, list[bytes]]

    async def inbound(self, *values: bytes) -> None:
        """Write ``values`` to medmesh.fhir.inbound (one poll) and wait until ingest committed
        them."""
        for value in values:
            self.kafka.append(topics.FHIR_INBOUND, value)
        end = len(self.kafka.records(topics.FHIR_INBOUND))
        for _ in range(2000):
            if self.kafka.offset(GROUP, topics.FHIR_INBOUND) == end:
                return
            await asyncio.sleep(0.005)
        raise AssertionError("ingest did not commit the inbound records within 10 s")


@asynccontextmanager
async def running(
    settings: IngestSettings, observe: tuple[str, ...] = ()
) -> AsyncIterator[Harness]:
    """The real ingest app, started (its lifespan), on an in-memory transactional Kafka;
    what it publishes outside transactions to the ``observe`` topics is collected."""
    kafka = FakeKafka()
    app = create_app(settings, clients=kafka.clients(GROUP))
    broker: KafkaBroker = app.state.broker
    published: dict[str, list[bytes]] = {topic: [] for topic in observe}
    for topic in observe:
        broker.subscriber(topic)(_collector(published[topic]))
    async with TestKafkaBroker(broker), app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://ingest") as client:
            yield Harness(client, kafka, Captured(kafka), app.state.ingest, published)


def _collector(into: list[bytes]) -> Callable[[KafkaMessage], Awaitable[None]]:
    async def collect(message: KafkaMessage) -> None:
        into.append(message.body)  # the bytes as published, not decoded as JSON

    return collect


def settings(**overrides: Any) -> IngestSettings:
    """Ingest settings for the in-memory broker (no state topic to rebuild from)."""
    return IngestSettings(model_specs_dir=SPECS_DIR, rebuild_readings_on_start=False, **overrides)


@pytest.fixture
async def ingest() -> AsyncIterator[Harness]:
    """Ingest without tokens (loopback), as `medmesh up` runs it."""
    async with running(settings()) as harness:
        yield harness


async def _post(harness: Harness, name: str, path: str = "/fhir") -> httpx.Response:
    return await harness.client.post(
        path,
        content=(FIXTURES / name).read_bytes(),
        headers={"content-type": "application/fhir+json"},
    )


async def test_complete_vitals_are_accepted_and_published(ingest: Harness) -> None:
    """A complete vitals Bundle gets 202 and one RequestInference keyed by pseudonym."""
    response = await _post(ingest, "vitals-bundle-high.json")
    assert response.status_code == 202
    assert response.json()["resourceType"] == "OperationOutcome"
    assert len(ingest.captured.requests) == 1
    request = RequestInference.model_validate_json(ingest.captured.requests[0])
    assert request.correlation_id == response.headers[h.CORRELATION_ID]
    assert request.subject_reference == "Patient/example-high"
    assert "example-high" not in request.patient_pseudonym
    assert [i.name for i in request.inputs][:2] == ["respiratory_rate", "spo2"]


async def test_missing_input_gets_a_warning_and_nothing_is_published(ingest: Harness) -> None:
    """Valid FHIR without SpO2 gets 200 with a warning naming spo2, and no request."""
    response = await _post(ingest, "bundle-missing-spo2.json")
    assert response.status_code == 200
    issues = response.json()["issue"]
    assert any(i["severity"] == "warning" and "spo2" in i["diagnostics"] for i in issues)
    assert ingest.captured.requests == []


async def test_invalid_fhir_gets_422_with_a_fhirpath_and_nothing_is_published(
    ingest: Harness,
) -> None:
    """An Observation with status 'bogus' is answered 422 naming its FHIRPath."""
    response = await _post(ingest, "bundle-invalid-status.json")
    assert response.status_code == 422
    expressions = [e for i in response.json()["issue"] for e in i.get("expression", [])]
    assert "Bundle.entry[1].resource.status" in expressions
    assert ingest.captured.requests == []


async def test_garbage_gets_400(ingest: Harness) -> None:
    """A body that is not JSON is answered 400 with an OperationOutcome."""
    response = await _post(ingest, "not-fhir.txt")
    assert response.status_code == 400
    assert response.json()["resourceType"] == "OperationOutcome"


async def test_other_fhir_versions_get_415(ingest: Harness) -> None:
    """A content type naming fhirVersion 3.0 (STU3) is answered 415 with an OperationOutcome."""
    response = await ingest.client.post(
        "/fhir", content=b"{}", headers={"content-type": "application/fhir+json; fhirVersion=3.0"}
    )
    assert response.status_code == 415
    assert response.json()["resourceType"] == "OperationOutcome"


async def test_capability_statement_names_r4b(ingest: Harness) -> None:
    """GET /fhir/metadata is a CapabilityStatement for FHIR 4.3.0."""
    response = await ingest.client.get("/fhir/metadata")
    assert response.json()["resourceType"] == "CapabilityStatement"
    assert response.json()["fhirVersion"] == "4.3.0"


async def test_inbound_garbage_is_dead_lettered_with_its_outcome(ingest: Harness) -> None:
    """Garbage on medmesh.fhir.inbound becomes a FhirEventRejected on medmesh.fhir.invalid."""
    await ingest.inbound(b"\xff\xfe not fhir")
    assert len(ingest.captured.invalid) == 1
    event = json.loads(ingest.captured.invalid[0])
    assert event["schema"] == "medmesh.FhirEventRejected/1"
    assert event["raw_encoding"] == "base64"
    assert event["operation_outcome"]["issue"][0]["severity"] in ("error", "fatal")
    assert ingest.captured.requests == []


async def test_inbound_vitals_become_a_request(ingest: Harness) -> None:
    """A valid Bundle on medmesh.fhir.inbound becomes a RequestInference."""
    await ingest.inbound((FIXTURES / "vitals-bundle-medium.json").read_bytes())
    assert len(ingest.captured.requests) == 1
    assert (
        RequestInference.model_validate_json(ingest.captured.requests[0]).source.channel == "kafka"
    )


# --- helpers for the front-door tests ----------------------------------------------------------

FHIR = {"content-type": "application/fhir+json"}
R5 = {"content-type": "application/fhir+json; fhirVersion=5.0"}


def load(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text())


def requests_of(harness: Harness) -> list[RequestInference]:
    return [RequestInference.model_validate_json(r) for r in harness.captured.requests]


async def post_json(
    harness: Harness, payload: Any, headers: dict[str, str] | None = None, path: str = "/fhir"
) -> httpx.Response:
    return await harness.client.post(
        path, content=json.dumps(payload).encode(), headers=headers or FHIR
    )


def diagnostics(response: httpx.Response) -> str:
    return " ".join(i.get("diagnostics", "") for i in response.json()["issue"])


def entry_statuses(response: httpx.Response) -> list[str]:
    """The response.status of each entry of a batch-response or transaction-response."""
    return [e["response"]["status"] for e in response.json().get("entry", [])]


# --- security and limits -----------------------------------------------------------------------


@pytest.fixture
async def secured() -> AsyncIterator[Harness]:
    """Ingest with one default token and one named R5 source."""
    sources = {"icu-r5": {"token": "r5-secret-token", "fhir_version": "R5", "site": "icu"}}
    async with running(
        settings(ingest_tokens="ward-token-1, ward-token-2", ingest_sources=sources)
    ) as harness:
        yield harness


async def test_missing_token_gets_401_with_an_operation_outcome(secured: Harness) -> None:
    """With tokens configured, a POST without Authorization is 401 with a Bearer challenge."""
    response = await _post(secured, "vitals-bundle-high.json")
    assert response.status_code == 401
    assert response.json()["resourceType"] == "OperationOutcome"
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert secured.captured.requests == []


async def test_wrong_token_gets_401(secured: Harness) -> None:
    """An unknown bearer token (or another scheme) is 401."""
    for value in ("Bearer nope", "Basic d2FyZDp4", "Bearer "):
        response = await secured.client.post(
            "/fhir",
            content=(FIXTURES / "vitals-bundle-high.json").read_bytes(),
            headers={**FHIR, "authorization": value},
        )
        assert response.status_code == 401, value


async def test_configured_token_is_accepted(secured: Harness) -> None:
    """Any of the comma-separated tokens is accepted."""
    response = await secured.client.post(
        "/fhir",
        content=(FIXTURES / "vitals-bundle-high.json").read_bytes(),
        headers={**FHIR, "authorization": "Bearer ward-token-2"},
    )
    assert response.status_code == 202


async def test_source_token_selects_r5_and_names_the_source(secured: Harness) -> None:
    """A named source configured for R5 has its payloads read as R5 and tagged with its name."""
    response = await secured.client.post(
        "/fhir",
        content=(FIXTURES / "r5-subscription-notification.json").read_bytes(),
        headers={**FHIR, "authorization": "Bearer r5-secret-token"},
    )
    assert response.status_code == 202, response.text
    [request] = requests_of(secured)
    assert request.source.fhir_version == "R5"
    assert request.source.source_system == "icu-r5"
    assert request.source.site == "icu"


def test_public_bind_without_tokens_is_refused() -> None:
    """create_app refuses a non-loopback listen address when no token is configured."""
    with pytest.raises(ValueError, match="without authentication"):
        create_app(settings(http_host="0.0.0.0"))  # noqa: S104 -- the address being refused


def test_public_bind_with_tokens_is_allowed() -> None:
    """With a token configured, ingest may listen on every address."""
    create_app(settings(http_host="0.0.0.0", ingest_tokens="t"))  # noqa: S104


async def test_body_over_the_size_limit_gets_413() -> None:
    """A body larger than max_payload_bytes is 413 with an OperationOutcome."""
    async with running(settings(max_payload_bytes=1000)) as harness:
        response = await _post(harness, "vitals-bundle-high.json")
    assert response.status_code == 413
    assert response.json()["issue"][0]["code"] == "too-costly"


async def test_deep_nesting_gets_413(ingest: Harness) -> None:
    """JSON nested deeper than the limit (even 100,000 levels) is 413, never a crash."""
    for depth in (40, 100_000):
        body = b'{"resourceType": "Observation", "x": ' + b"[" * depth + b"]" * depth + b"}"
        response = await ingest.client.post("/fhir", content=body, headers=FHIR)
        assert response.status_code == 413, depth
        assert response.json()["resourceType"] == "OperationOutcome"


async def test_too_many_entries_gets_413() -> None:
    """A Bundle with more entries than max_bundle_entries is 413 naming Bundle.entry."""
    async with running(settings(max_bundle_entries=5)) as harness:
        response = await _post(harness, "vitals-bundle-high.json")
    assert response.status_code == 413
    assert response.json()["issue"][0]["expression"] == ["Bundle.entry"]


async def test_media_type_other_than_json_gets_415(ingest: Harness) -> None:
    """XML (or any non-JSON media type) is 415 with an OperationOutcome."""
    response = await ingest.client.post(
        "/fhir", content=b"<Bundle/>", headers={"content-type": "application/fhir+xml"}
    )
    assert response.status_code == 415
    assert response.json()["resourceType"] == "OperationOutcome"


async def test_kafka_failure_gets_503_with_retry_after(ingest: Harness) -> None:
    """When Kafka does not acknowledge, the answer is 503 with Retry-After, and a retry works."""

    ingest.kafka.fail_sends = 1
    response = await _post(ingest, "vitals-bundle-high.json")
    assert response.status_code == 503
    assert response.headers["retry-after"] == "5"
    assert response.json()["issue"][0]["code"] == "transient"
    assert ingest.captured.requests == ingest.captured.states == []  # the transaction aborted
    retried = await _post(ingest, "vitals-bundle-high.json")
    assert retried.status_code == 202  # the failed attempt left no state behind


@pytest.mark.parametrize(
    ("code", "value", "unit", "named"),
    [
        ("8867-4", -12, "/min", "-12 /min"),
        ("59408-5", 104, "%", "104 %"),
        ("8310-5", 120.0, "[degF]", "48.8889 Cel"),
        ("8310-5", 21.5, "Cel", "21.5 Cel"),
    ],
)
async def test_impossible_values_get_422_naming_the_value(
    ingest: Harness, code: str, value: float, unit: str, named: str
) -> None:
    """Negative rates, SpO2 over 100 % and temperatures outside 25-45 Cel are 422 naming it."""
    observation = load("observation-heart-rate.json")
    observation["code"]["coding"][0]["code"] = code
    observation["valueQuantity"] = {
        "value": value,
        "system": "http://unitsofmeasure.org",
        "code": unit,
    }
    response = await post_json(ingest, observation)
    assert response.status_code == 422
    assert named in diagnostics(response)
    assert response.json()["issue"][0]["expression"] == ["Observation.valueQuantity.value"]
    assert ingest.captured.requests == []


# --- shapes ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["subscription-handshake.json", "subscription-heartbeat.json"])
async def test_subscription_handshake_and_heartbeat_get_200(ingest: Harness, name: str) -> None:
    """Handshake and heartbeat notifications are acknowledged with 200 and start nothing."""
    response = await _post(ingest, name)
    assert response.status_code == 200
    assert "acknowledged" in diagnostics(response)
    assert ingest.captured.requests == []


async def test_subscription_full_resource_notification_is_processed(ingest: Harness) -> None:
    """An R4B event-notification with full resources becomes a request."""
    response = await _post(ingest, "subscription-event-full.json")
    assert response.status_code == 202, response.text
    [request] = requests_of(ingest)
    assert request.subject_reference == "Patient/example-subscription"


async def test_id_only_notification_without_a_source_server_gets_a_warning(
    ingest: Harness,
) -> None:
    """An id-only notification with no FHIR server configured is 200 with a warning."""
    response = await _post(ingest, "subscription-event-id-only.json")
    assert response.status_code == 200
    assert response.json()["issue"][0]["severity"] == "warning"
    assert "no FHIR server is configured" in diagnostics(response)
    assert ingest.captured.requests == []


def _source_server(seen: list[httpx.Request]) -> httpx.MockTransport:
    source = load("subscription-id-only-source.json")
    by_url = {e["fullUrl"]: e["resource"] for e in source["entry"]}

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        resource = by_url.get(str(request.url))
        if resource is None:
            return httpx.Response(404)
        return httpx.Response(200, json=resource)

    return httpx.MockTransport(answer)


async def test_id_only_notification_is_fetched_from_the_source_server() -> None:
    """With a source base URL and token, id-only content is fetched with the token and scored."""
    seen: list[httpx.Request] = []
    configured = settings(
        source_base_url="https://ehr.st-elsewhere.example/fhir",
        source_token="fetch-secret",  # noqa: S106 -- a test token
    )
    async with running(configured) as harness:
        harness.ingest.http_client = httpx.AsyncClient(transport=_source_server(seen))
        response = await _post(harness, "subscription-event-id-only.json")
        [request] = requests_of(harness)
    assert response.status_code == 202, response.text
    assert request.subject_reference == "Patient/example-id-only"
    assert len(seen) == 7
    assert all(r.headers["authorization"] == "Bearer fetch-secret" for r in seen)


async def test_id_only_fetch_failure_gets_503() -> None:
    """When the source server fails, the notification is 503 with Retry-After (it is resent)."""
    configured = settings(source_base_url="https://ehr.st-elsewhere.example/other")
    async with running(configured) as harness:
        harness.ingest.http_client = httpx.AsyncClient(transport=_source_server([]))
        response = await _post(harness, "subscription-event-id-only.json")
    assert response.status_code == 422  # the references are not on the configured server
    configured = settings(source_base_url="https://ehr.st-elsewhere.example/fhir")
    async with running(configured) as harness:
        harness.ingest.http_client = httpx.AsyncClient(
            transport=httpx.MockTransport(lambda _r: httpx.Response(500))
        )
        response = await _post(harness, "subscription-event-id-only.json")
    assert response.status_code == 503
    assert "retry-after" in response.headers


async def test_r5_notification_by_content_type_is_processed(ingest: Harness) -> None:
    """fhirVersion=5.0 reads the payload as R5: a subscription-notification is processed."""
    response = await ingest.client.post(
        "/fhir",
        content=(FIXTURES / "r5-subscription-notification.json").read_bytes(),
        headers=R5,
    )
    assert response.status_code == 202, response.text
    [request] = requests_of(ingest)
    assert request.source.fhir_version == "R5"
    assert request.subject_reference == "Patient/example-r5"


async def test_subscription_notification_bundle_is_read_as_r4b_too(ingest: Harness) -> None:
    """R4B has the subscription-notification Bundle type too: without fhirVersion, such a
    Bundle (a SubscriptionStatus first, R4B's shape) is processed as a notification."""
    response = await _post(ingest, "r5-subscription-notification.json")
    assert response.status_code == 202, response.text
    [request] = requests_of(ingest)
    assert request.subject_reference == "Patient/example-r5"


async def test_message_bundle_becomes_a_request(ingest: Harness) -> None:
    """A message Bundle (MessageHeader first) is scored: 202 with an OperationOutcome."""
    response = await _post(ingest, "message-bundle.json")
    assert response.status_code == 202, response.text
    assert response.json()["resourceType"] == "OperationOutcome"
    [request] = requests_of(ingest)
    assert request.subject_reference.startswith("Patient/example-")


async def test_transaction_becomes_a_request_and_a_transaction_response(ingest: Harness) -> None:
    """A transaction with urn:uuid refs is scored and answered 200 with a transaction-response
    (it was 202 with an OperationOutcome before issue 18)."""
    response = await _post(ingest, "transaction-bundle.json")
    assert response.status_code == 200, response.text
    assert response.json()["type"] == "transaction-response"
    [request] = requests_of(ingest)
    assert request.subject_reference == "Patient/example-transaction"


async def test_message_bundle_without_message_header_first_gets_422(ingest: Harness) -> None:
    """A message Bundle whose first entry is not a MessageHeader is 422 at Bundle.entry[0]."""
    bundle = load("message-bundle.json")
    bundle["entry"].append(bundle["entry"].pop(0))
    response = await post_json(ingest, bundle)
    assert response.status_code == 422
    assert response.json()["issue"][0]["expression"] == ["Bundle.entry[0].resource"]


# --- one reading at a time, orders, idempotency ------------------------------------------------

ONE_BY_ONE = ["rr", "spo2", "o2-flow", "temp", "bp", "hr", "acvpu"]


async def _send_one_by_one(harness: Harness, names: list[str]) -> list[httpx.Response]:
    return [
        await _post(harness, f"one-by-one/{name}.json", path="/fhir/Observation") for name in names
    ]


async def test_single_observations_are_scored_when_the_set_is_complete(ingest: Harness) -> None:
    """Observations sent one by one give exactly one request, when the last one arrives."""
    responses = await _send_one_by_one(ingest, ONE_BY_ONE)
    assert [r.status_code for r in responses] == [200] * 6 + [202]
    assert "kept" in diagnostics(responses[0])
    [request] = requests_of(ingest)
    assert {i.name: i.value for i in request.inputs}["heart_rate"] == 118
    assert len(ingest.captured.states) == 7


async def test_same_version_again_sends_nothing_new_version_does(ingest: Harness) -> None:
    """A resent reading (same id and versionId) adds no request; a corrected version adds one."""
    await _send_one_by_one(ingest, ONE_BY_ONE)
    again = await _post(ingest, "one-by-one/hr.json", path="/fhir/Observation")
    assert again.status_code == 200
    assert "already sent" in diagnostics(again)
    corrected = load("one-by-one/hr.json")
    corrected["meta"]["versionId"] = "2"
    corrected["status"] = "corrected"
    corrected["valueQuantity"]["value"] = 84
    response = await post_json(ingest, corrected)
    assert response.status_code == 202, response.text
    first, second = requests_of(ingest)
    assert {i.name: i.value for i in second.inputs}["heart_rate"] == 84
    assert first.correlation_id != second.correlation_id


async def test_same_bundle_twice_gives_one_request(ingest: Harness) -> None:
    """The same batch posted twice gives one request: both are answered 200 (batch-response),
    the first with its Observations 202 Accepted, the second with none (already sent)."""
    first = await _post(ingest, "vitals-bundle-medium.json")
    second = await _post(ingest, "vitals-bundle-medium.json")
    assert (first.status_code, second.status_code) == (200, 200)
    assert "202 Accepted" in entry_statuses(first)
    assert set(entry_statuses(second)) == {"200 OK"}
    assert "already sent" in second.text
    assert len(ingest.captured.requests) == 1


async def test_service_request_orders_a_score_with_based_on(ingest: Harness) -> None:
    """A ServiceRequest naming the model scores the stored readings, basedOn the order, once."""
    await _send_one_by_one(ingest, ONE_BY_ONE)
    response = await _post(ingest, "service-request-order.json", path="/fhir/ServiceRequest")
    assert response.status_code == 202, response.text
    again = await _post(ingest, "service-request-order.json", path="/fhir/ServiceRequest")
    assert again.status_code == 200
    requests = requests_of(ingest)
    assert len(requests) == 2
    assert requests[1].based_on_reference == "ServiceRequest/example-order-1"
    assert requests[0].based_on_reference is None


async def test_order_without_readings_gets_a_warning(ingest: Harness) -> None:
    """An order for a patient with no readings is 200 with a warning naming the missing inputs."""
    response = await _post(ingest, "service-request-order.json")
    assert response.status_code == 200
    assert "respiratory_rate" in diagnostics(response)
    assert ingest.captured.requests == []


async def test_inbound_single_readings_share_the_state_with_http(ingest: Harness) -> None:
    """Readings from the inbound topic and HTTP complete the same patient's set."""
    for name in ONE_BY_ONE[:-1]:
        payload = (FIXTURES / f"one-by-one/{name}.json").read_bytes()
        await ingest.inbound(payload)
    assert ingest.captured.requests == []
    response = await _post(ingest, f"one-by-one/{ONE_BY_ONE[-1]}.json")
    assert response.status_code == 202
    assert ingest.captured.invalid == []


async def test_inbound_impossible_value_is_dead_lettered(ingest: Harness) -> None:
    """An impossible value on the inbound topic lands on medmesh.fhir.invalid naming the value."""
    observation = load("one-by-one/spo2.json")
    observation["valueQuantity"]["value"] = 140
    await ingest.inbound(json.dumps(observation).encode())
    [event] = [json.loads(e) for e in ingest.captured.invalid]
    assert "140 %" in json.dumps(event["operation_outcome"])


async def test_an_inbound_poll_with_garbage_between_readings_publishes_one_request(
    ingest: Harness,
) -> None:
    """One poll holding a patient's seven readings with garbage among them: the garbage is
    dead-lettered, the readings merge in order into one request, then one state."""
    payloads = [(FIXTURES / f"one-by-one/{name}.json").read_bytes() for name in ONE_BY_ONE]
    await ingest.inbound(*payloads[:3], b"not json", *payloads[3:])
    assert len(ingest.captured.invalid) == 1
    assert len(ingest.captured.requests) == 1
    assert len(ingest.captured.states) == 1
    request = RequestInference.model_validate_json(ingest.captured.requests[0])
    assert {i.name for i in request.inputs if i.observed_at is not None} >= {
        "respiratory_rate",
        "heart_rate",
        "not_alert",
    }


async def test_health_and_readiness_answer_like_every_service(ingest: Harness) -> None:
    """/healthz answers 204; /readyz 204 once started, 503 when ingest stops taking payloads."""
    assert (await ingest.client.get("/healthz")).status_code == 204
    assert (await ingest.client.get("/readyz")).status_code == 204
    ingest.ingest.ready = False
    assert (await ingest.client.get("/readyz")).status_code == 503


# --- batch and transaction answers (FHIR http.html, transaction-response) ----------------------


def _spo2_entry(value: float, *, status: str = "final", id_: str = "extra-spo2") -> dict[str, Any]:
    """An SpO2 Observation of vitals-bundle-medium's patient, as an entry of that batch."""
    entry: dict[str, Any] = load("vitals-bundle-medium.json")["entry"][2]
    entry["resource"].update(
        id=id_, status=status, code={"coding": [{"system": "http://loinc.org", "code": "59408-5"}]}
    )
    entry["resource"]["valueQuantity"]["value"] = value
    entry["fullUrl"] = f"https://ehr.st-elsewhere.example/fhir/Observation/{id_}"
    entry["request"]["url"] = f"Observation/{id_}"
    return entry


async def test_batch_gets_a_valid_batch_response(ingest: Harness) -> None:
    """A vitals batch: 200, a valid R4B batch-response (bdl rules included) with one entry per
    request entry, each Observation 202 Accepted naming the request in the header; no location."""
    response = await _post(ingest, "vitals-bundle-medium.json")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/fhir+json")
    body = response.json()
    assert response_problems(body, load("vitals-bundle-medium.json"), "R4B") == []
    assert entry_statuses(response) == ["200 OK"] + ["202 Accepted"] * 7
    [request] = requests_of(ingest)
    assert response.headers[h.CORRELATION_ID] == request.correlation_id
    assert request.correlation_id in json.dumps(body["entry"][1]["response"]["outcome"])
    assert all("location" not in e["response"] for e in body["entry"])


async def test_batch_entries_fail_alone(ingest: Harness) -> None:
    """A batch with an entry of bogus status and one of impossible SpO2: those get 422 with
    their FHIRPaths, the rest is scored and published."""
    bundle = load("vitals-bundle-medium.json")
    bundle["entry"] += [_spo2_entry(94, status="bogus", id_="a"), _spo2_entry(140, id_="b")]
    response = await post_json(ingest, bundle)
    assert response.status_code == 200, response.text
    assert response_problems(response.json(), bundle, "R4B") == []
    assert [s[:3] for s in entry_statuses(response)] == ["200"] + ["202"] * 7 + ["422"] * 2
    entries = response.json()["entry"]
    assert "Bundle.entry[8].resource.status" in json.dumps(entries[8])
    assert "Bundle.entry[9].resource.valueQuantity.value" in json.dumps(entries[9])
    assert len(ingest.captured.requests) == 1


async def test_invalid_transaction_is_rejected_whole_and_nothing_is_published(
    ingest: Harness,
) -> None:
    """All or nothing: a transaction with one impossible value is 422 with one OperationOutcome
    naming the entry, and neither a request nor a patient state reaches Kafka."""
    bundle = load("vitals-bundle-low.json")
    bad = _spo2_entry(140)
    bad["resource"]["subject"] = {"reference": "Patient/example-low"}
    bundle["entry"].append(bad)
    response = await post_json(ingest, bundle)
    assert response.status_code == 422
    assert response.json()["resourceType"] == "OperationOutcome"
    assert "Bundle.entry[8].resource.valueQuantity.value" in json.dumps(response.json())
    assert ingest.captured.requests == []
    assert ingest.captured.states == []


async def test_r5_transaction_gets_a_valid_r5_transaction_response(ingest: Harness) -> None:
    """An R5 ECG transaction (fhirVersion=5.0): 200 and a transaction-response valid in R5."""
    response = await ingest.client.post(
        "/fhir", content=(FIXTURES / "ecg-af-r5.json").read_bytes(), headers=R5
    )
    assert response.status_code == 200, response.text
    assert response_problems(response.json(), load("ecg-af-r5.json"), "R5") == []
    assert entry_statuses(response) == ["200 OK", "202 Accepted"]


async def test_kafka_failure_on_a_batch_gets_503_and_nothing_is_taken(ingest: Harness) -> None:
    """Kafka does not acknowledge a batch: 503 with Retry-After and an OperationOutcome (no
    batch-response), nothing committed; the retry gets the batch-response."""
    ingest.kafka.fail_sends = 1
    response = await _post(ingest, "vitals-bundle-medium.json")
    assert response.status_code == 503
    assert response.headers["retry-after"] == "5"
    assert response.json()["resourceType"] == "OperationOutcome"
    assert ingest.captured.requests == []
    assert ingest.captured.states == []
    retried = await _post(ingest, "vitals-bundle-medium.json")
    assert retried.status_code == 200
    assert "202 Accepted" in entry_statuses(retried)


async def test_inbound_batch_with_an_invalid_entry_is_still_dead_lettered_whole(
    ingest: Harness,
) -> None:
    """The inbound topic answers nobody: a batch with one invalid entry is rejected whole onto
    medmesh.fhir.invalid and nothing of it is published, as before."""
    bundle = load("vitals-bundle-medium.json")
    bundle["entry"].append(_spo2_entry(140))
    await ingest.inbound(json.dumps(bundle).encode())
    assert len(ingest.captured.invalid) == 1
    assert ingest.captured.requests == []


async def test_capability_statement_security_follows_the_configuration(
    ingest: Harness, secured: Harness
) -> None:
    """Without tokens the statement says there is no authentication; with tokens it names the
    static bearer tokens. Both are valid R4B."""
    plain = (await ingest.client.get("/fhir/metadata")).json()
    tokens = (await secured.client.get("/fhir/metadata")).json()
    R4BCapabilityStatement.model_validate(plain)
    R4BCapabilityStatement.model_validate(tokens)
    assert "service" not in plain["rest"][0]["security"]
    assert "No authentication" in plain["rest"][0]["security"]["description"]
    assert tokens["rest"][0]["security"]["service"][0]["text"].startswith("Bearer token")


async def test_capability_statement_in_r5_on_request(ingest: Harness) -> None:
    """Accept with fhirVersion=5.0 gets a valid R5 statement; a version not spoken gets 406."""
    r5 = await ingest.client.get("/fhir/metadata", headers={"accept": R5["content-type"]})
    assert r5.json()["fhirVersion"] == "5.0.0"
    R5CapabilityStatement.model_validate(r5.json())
    stu3 = await ingest.client.get(
        "/fhir/metadata", headers={"accept": "application/fhir+json; fhirVersion=3.0"}
    )
    assert stu3.status_code == 406
    assert stu3.json()["resourceType"] == "OperationOutcome"


async def test_every_advertised_interaction_is_honoured() -> None:
    """Each interaction the CapabilityStatement lists is done as it says: a batch and a
    transaction are answered with their response Bundles, each listed type's create with 2xx."""
    # The imaging fixture's PACS allowed, as a site that announces studies configures it.
    async with running(settings(pacs_urls="http://pacs.test:8042/dicom-web")) as ingest:
        await _honours_every_advertised_interaction(ingest)


async def _honours_every_advertised_interaction(ingest: Harness) -> None:
    [rest] = (await ingest.client.get("/fhir/metadata")).json()["rest"]
    samples = {"batch": "vitals-bundle-medium.json", "transaction": "vitals-bundle-low.json"}
    for interaction in rest["interaction"]:
        response = await _post(ingest, samples[interaction["code"]])
        assert response.status_code == 200
        assert response.json()["type"] == f"{interaction['code']}-response"
    creates = {
        "Observation": "observation-heart-rate.json",
        "ImagingStudy": "imaging/imaging-study-dx.json",
        "ServiceRequest": "service-request-order.json",
    }
    for resource in rest["resource"]:
        assert [i["code"] for i in resource["interaction"]] == ["create"]
        response = await _post(ingest, creates[resource["type"]], f"/fhir/{resource['type']}")
        assert response.status_code in (200, 202), response.text


async def test_a_post_is_one_server_span_by_the_http_conventions(tmp_path: Path) -> None:
    """A POST /fhir is one SERVER span named by its route, continuing the caller's traceparent,
    with the stable HTTP attributes (no header recorded), and counted in the seconds histogram
    http.server.request.duration; the probes make no span."""
    spans_file = tmp_path / "spans.jsonl"
    caller_trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    async with running(settings(trace_file=spans_file)) as ingest:
        await ingest.client.get("/readyz")
        response = await ingest.client.post(
            "/fhir",
            content=(FIXTURES / "vitals-bundle-low.json").read_bytes(),
            headers={
                "content-type": "application/fhir+json",
                "traceparent": f"00-{caller_trace}-00f067aa0ba902b7-01",
            },
        )
        assert response.status_code == 200, response.text  # a batch: its batch-response
        metrics = prometheus_text().decode()
    spans = [json.loads(line) for line in spans_file.read_text().splitlines()]
    servers = [s for s in spans if s["kind"] == "SERVER"]
    assert [s["name"] for s in servers] == ["POST /fhir"]
    [server] = servers
    assert server["trace_id"] == caller_trace
    assert server["attributes"]["http.request.method"] == "POST"
    assert server["attributes"]["http.response.status_code"] == 200
    assert not [k for k in server["attributes"] if k.startswith("http.request.header")]
    assert 'http_route="/fhir"' in metrics
    assert "http_server_request_duration_seconds_bucket" in metrics


async def test_the_encounters_ward_and_site_reach_the_request_and_its_headers(
    ingest: Harness,
) -> None:
    """A Bundle whose Encounter is in a bed of the ICU ward, at a named service provider, gives
    a request whose source (and routing headers, what the router's rules read) say ward icu and
    that site."""
    bundle = json.loads((FIXTURES / "vitals-bundle-high.json").read_text())
    ward = "http://terminology.hl7.org/CodeSystem/location-physical-type"
    for entry in bundle["entry"]:
        if entry["resource"]["resourceType"] == "Encounter":
            entry["resource"]["location"] = [
                {"location": {"reference": "Location/icu-bed-4"}, "status": "active"}
            ]
            entry["resource"]["serviceProvider"] = {"display": "North"}
    bundle["entry"] += [
        {
            "fullUrl": f"https://ehr.example/fhir/Location/{ident}",
            "resource": {
                "resourceType": "Location",
                "id": ident,
                "name": name,
                "physicalType": {"coding": [{"system": ward, "code": code}]},
                **({"partOf": {"reference": "Location/icu"}} if ident != "icu" else {}),
            },
        }
        for ident, name, code in (("icu", "icu", "wa"), ("icu-bed-4", "ICU bed 4", "bd"))
    ]
    response = await ingest.client.post(
        "/fhir", content=json.dumps(bundle), headers={"content-type": "application/fhir+json"}
    )
    assert response.status_code == 202, response.text  # a collection: accepted
    [record] = ingest.kafka.records(topics.INFERENCE_REQUESTS)
    request = RequestInference.model_validate_json(record.value or b"")
    assert (request.source.ward, request.source.site) == ("icu", "North")
    headers = {k: (v or b"").decode() for k, v in record.headers}
    assert (headers[h.WARD], headers[h.SITE]) == ("icu", "North")
