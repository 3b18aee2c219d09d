"""Missed Subscription notifications, end to end through the ingest app on the in-memory
broker: a gap in the event numbers (or a heartbeat's counter) is asked of the source with the
backport IG's $events and processed as if notified; events already handled are not processed
twice; a source that cannot answer leaves a warning and a counted gap, never a crash."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from medmesh_contracts import topics
from medmesh_contracts.events import RequestInference, SubscriptionEventsHandled
from medmesh_ingest import service as service_module
from medmesh_ingest import validation
from medmesh_ingest.state_topic import ReadingsFollower
from medmesh_runtime.metrics import prometheus_text
from tests.service.conftest import FIXTURES
from tests.service.test_ingest_app import Harness, running, settings

BASE = "https://ehr.st-elsewhere.example/fhir"
EVENTS_URL = f"{BASE}/Subscription/medmesh-vitals/$events"


def _load(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text())


async def _post(harness: Harness, payload: Any) -> httpx.Response:
    return await harness.client.post(
        "/fhir",
        content=json.dumps(payload).encode(),
        headers={"content-type": "application/fhir+json"},
    )


def _requests(harness: Harness) -> list[RequestInference]:
    return [RequestInference.model_validate_json(v) for v in harness.captured.requests]


def _inputs(request: RequestInference) -> dict[str, float]:
    return {i.name: i.value for i in request.inputs}


def _heartbeat(since: int) -> Any:
    heartbeat = _load("subscription-heartbeat.json")
    heartbeat["entry"][0]["resource"]["eventsSinceSubscriptionStart"] = str(since)
    return heartbeat


def _gap_count(outcome: str) -> float:
    for line in prometheus_text().decode().splitlines():
        if line.startswith("medmesh_ingest_subscription_gaps_total{") and (
            f'outcome="{outcome}"' in line
        ):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _source(seen: list[httpx.Request], status: int = 200) -> httpx.MockTransport:
    """The EHR's FHIR server: answers $events with the recovered-events fixture (or ``status``)."""
    recovered = (FIXTURES / "subscription-events-recovered.json").read_bytes()

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if str(request.url).split("?")[0] != EVENTS_URL or status != 200:
            return httpx.Response(status if status != 200 else 404)
        return httpx.Response(200, content=recovered)

    return httpx.MockTransport(answer)


@pytest.fixture
async def ehr_source() -> Any:
    """Ingest with a FHIR server configured for its default source (token ``fetch-secret``)."""
    configured = settings(source_base_url=BASE, source_token="fetch-secret")  # noqa: S106 -- a test token
    async with running(configured) as harness:
        yield harness


async def test_jump_in_event_numbers_is_recovered_with_events(ehr_source: Harness) -> None:
    """Events 1-7, then event 10: ingest asks $events for 8 to 9 (full resources, with the
    source's token) and the request it sends holds the recovered readings."""
    seen: list[httpx.Request] = []
    ehr_source.ingest.http_client = httpx.AsyncClient(transport=_source(seen))
    before = _gap_count("recovered")
    assert (await _post(ehr_source, _load("subscription-event-full.json"))).status_code == 202
    response = await _post(ehr_source, _load("subscription-event-gap.json"))
    assert response.status_code == 202, response.text
    [asked] = seen
    assert str(asked.url).split("?")[0] == EVENTS_URL
    assert dict(asked.url.params) == {
        "eventsSinceNumber": "8",
        "eventsUntilNumber": "9",
        "content": "full-resource",
    }
    assert asked.headers["authorization"] == "Bearer fetch-secret"
    # As if notified: the missed events' readings are merged first (one request, as their own
    # notification would have made), then the notification's own.
    _, recovered, notified = _requests(ehr_source)
    assert _inputs(recovered) | {"heart_rate": 0} == _inputs(notified) | {"heart_rate": 0}
    assert (_inputs(recovered)["respiratory_rate"], _inputs(recovered)["spo2"]) == (20, 95)
    assert (_inputs(recovered)["heart_rate"], _inputs(notified)["heart_rate"]) == (118, 104)
    assert "asked for again" in json.dumps(response.json())
    assert _gap_count("recovered") == before + 1


async def test_heartbeat_counter_shows_missed_events(ehr_source: Harness) -> None:
    """A heartbeat saying 9 events were sent after events 1-7 were handled: events 8-9 are
    recovered and scored, though a heartbeat alone scores nothing."""
    seen: list[httpx.Request] = []
    ehr_source.ingest.http_client = httpx.AsyncClient(transport=_source(seen))
    await _post(ehr_source, _load("subscription-event-full.json"))
    response = await _post(ehr_source, _heartbeat(9))
    assert response.status_code == 202, response.text
    assert len(seen) == 1
    assert len(_requests(ehr_source)) == 2
    # Nothing is missing any more: the next heartbeat asks nothing.
    assert (await _post(ehr_source, _heartbeat(9))).status_code == 200
    assert len(seen) == 1


async def test_late_original_is_not_processed_twice(ehr_source: Harness) -> None:
    """After events 8-9 were recovered, their original notification arriving late is
    acknowledged as already handled: no request, no state, no $events."""
    seen: list[httpx.Request] = []
    ehr_source.ingest.http_client = httpx.AsyncClient(transport=_source(seen))
    await _post(ehr_source, _load("subscription-event-full.json"))
    await _post(ehr_source, _load("subscription-event-gap.json"))
    requests, states = len(ehr_source.captured.requests), len(ehr_source.captured.states)
    original = _load("subscription-events-recovered.json")
    original["entry"][0]["resource"]["type"] = "event-notification"
    response = await _post(ehr_source, original)
    assert response.status_code == 200, response.text
    assert response.json()["issue"][0]["code"] == "duplicate"
    assert len(ehr_source.captured.requests) == requests
    assert len(ehr_source.captured.states) == states
    assert len(seen) == 1


@pytest.mark.parametrize("status", [503, 500, 429, 408])
async def test_source_that_cannot_answer_events_leaves_a_warning(
    ehr_source: Harness, status: int
) -> None:
    """$events answered with a status that may pass: the notification itself is still
    processed (202), the answer warns which events are missing, the gap is counted as failed,
    and the next notification asks for them again."""
    seen: list[httpx.Request] = []
    ehr_source.ingest.http_client = httpx.AsyncClient(transport=_source(seen, status=status))
    before = _gap_count("failed")
    await _post(ehr_source, _load("subscription-event-full.json"))
    response = await _post(ehr_source, _load("subscription-event-gap.json"))
    assert response.status_code == 202, response.text
    warnings = [i for i in response.json()["issue"] if i["severity"] == "warning"]
    assert any(
        "events 8 to 9" in w["diagnostics"] and str(status) in w["diagnostics"] for w in warnings
    )
    assert _gap_count("failed") == before + 1
    await _post(ehr_source, _heartbeat(10))
    assert len(seen) == 2
    assert dict(seen[1].url.params)["eventsSinceNumber"] == "8"


@pytest.mark.parametrize("status", [404, 405, 400, 403, 501])
async def test_a_source_without_events_is_asked_once(ehr_source: Harness, status: int) -> None:
    """$events answered with a status that will not change (a server without the operation:
    404, 405, 501; another 4xx): the gap is reported once, not asked for again, and a late
    notification of its events is still processed."""
    seen: list[httpx.Request] = []
    ehr_source.ingest.http_client = httpx.AsyncClient(transport=_source(seen, status=status))
    await _post(ehr_source, _load("subscription-event-full.json"))
    response = await _post(ehr_source, _load("subscription-event-gap.json"))
    assert response.status_code == 202, response.text
    assert "not asked for again" in json.dumps(response.json())
    heartbeat = await _post(ehr_source, _heartbeat(10))
    assert heartbeat.status_code == 200
    assert len(seen) == 1
    original = _load("subscription-events-recovered.json")
    original["entry"][0]["resource"]["type"] = "event-notification"
    assert (await _post(ehr_source, original)).status_code == 202


async def test_an_events_answer_over_the_size_limit_is_asked_once() -> None:
    """$events answered with a body over MEDMESH_MAX_PAYLOAD_BYTES: reported once (naming the
    size limit), not asked for again."""
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, content=b" " * 300_000)

    configured = settings(source_base_url=BASE, source_token="t", max_payload_bytes=200_000)  # noqa: S106 -- a test token
    async with running(configured) as harness:
        harness.ingest.http_client = httpx.AsyncClient(transport=httpx.MockTransport(answer))
        await _post(harness, _load("subscription-event-full.json"))
        response = await _post(harness, _load("subscription-event-gap.json"))
        assert "size limit" in json.dumps(response.json())
        assert "not asked for again" in json.dumps(response.json())
        await _post(harness, _heartbeat(10))
    assert len(seen) == 1


async def test_a_subscription_elsewhere_is_not_asked_again(ehr_source: Harness) -> None:
    """A notification whose subscription is not on the source's FHIR server: the gap cannot
    be asked for there, and is reported once."""
    seen: list[httpx.Request] = []
    ehr_source.ingest.http_client = httpx.AsyncClient(transport=_source(seen))
    elsewhere = "https://other.example/fhir/Subscription/medmesh-vitals"
    first, gap = _load("subscription-event-full.json"), _load("subscription-event-gap.json")
    for bundle in (first, gap):
        bundle["entry"][0]["resource"]["subscription"]["reference"] = elsewhere
    await _post(ehr_source, first)
    response = await _post(ehr_source, gap)
    assert "not on the source's FHIR server" in json.dumps(response.json())
    assert "not asked for again" in json.dumps(response.json())
    heartbeat = _heartbeat(10)
    heartbeat["entry"][0]["resource"]["subscription"]["reference"] = elsewhere
    assert "never arrived" not in json.dumps((await _post(ehr_source, heartbeat)).json())
    assert seen == []


async def test_gap_without_a_source_server_is_reported_once() -> None:
    """No FHIR server configured for the source: the gap is reported in the answer (a
    warning) and the notification processed; nothing can ever recover it, so the next
    notification does not report it again."""
    async with running(settings()) as harness:
        await _post(harness, _load("subscription-event-full.json"))
        response = await _post(harness, _load("subscription-event-gap.json"))
        assert response.status_code == 202, response.text
        assert "no FHIR server is configured" in json.dumps(response.json())
        assert "not asked for again" in json.dumps(response.json())
        heartbeat = await _post(harness, _heartbeat(10))
    assert heartbeat.status_code == 200
    assert "never arrived" not in json.dumps(heartbeat.json())


async def test_late_event_of_an_unrecovered_gap_is_processed_once() -> None:
    """Events 8-9 missed and not recoverable (no FHIR server): their original notification
    arriving late is processed (202, a request), not answered as a duplicate; the record on
    Kafka names 8-9 until then; a second resend is the 200 duplicate."""
    async with running(settings(), observe=(topics.INGEST_SUBSCRIPTIONS,)) as harness:
        await _post(harness, _load("subscription-event-full.json"))
        await _post(harness, _load("subscription-event-gap.json"))
        requests = len(harness.captured.requests)
        original = _load("subscription-events-recovered.json")
        original["entry"][0]["resource"]["type"] = "event-notification"
        late = await _post(harness, original)
        assert late.status_code == 202, late.text
        assert len(harness.captured.requests) == requests + 1
        again = await _post(harness, original)
        assert again.status_code == 200, again.text
        assert again.json()["issue"][0]["code"] == "duplicate"
        records = [
            SubscriptionEventsHandled.model_validate_json(value)
            for value in harness.published[topics.INGEST_SUBSCRIPTIONS]
        ]
    assert [
        (r.highest_event_number, [(u.first, u.last) for u in r.unrecovered]) for r in records
    ] == [
        (7, []),
        (10, [(8, 9)]),
        (10, []),
    ]


async def test_invalid_events_answer_is_reported_once(ehr_source: Harness) -> None:
    """$events answered with a Bundle that is not a valid notification (an entry without its
    request): the gap is reported, naming the rule, and not asked for again."""
    seen: list[httpx.Request] = []
    broken = _load("subscription-events-recovered.json")
    del broken["entry"][1]["request"]

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=broken)

    ehr_source.ingest.http_client = httpx.AsyncClient(transport=httpx.MockTransport(answer))
    await _post(ehr_source, _load("subscription-event-full.json"))
    response = await _post(ehr_source, _load("subscription-event-gap.json"))
    assert response.status_code == 202, response.text
    assert "bdl-3" in json.dumps(response.json())
    await _post(ehr_source, _heartbeat(10))
    assert len(seen) == 1


async def test_events_answer_with_other_digits_is_reported_once(ehr_source: Harness) -> None:
    """$events answered with an eventNumber of digits other than ASCII ('\u00b2'): the
    invalid-answer path (reported once, the notification processed), never a 500."""
    seen: list[httpx.Request] = []
    broken = _load("subscription-events-recovered.json")
    broken["entry"][0]["resource"]["notificationEvent"][0]["eventNumber"] = "\u00b2"

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=broken)

    ehr_source.ingest.http_client = httpx.AsyncClient(transport=httpx.MockTransport(answer))
    await _post(ehr_source, _load("subscription-event-full.json"))
    response = await _post(ehr_source, _load("subscription-event-gap.json"))
    assert response.status_code == 202, response.text
    assert "not an event count" in json.dumps(response.json())
    await _post(ehr_source, _heartbeat(10))
    assert len(seen) == 1


async def test_a_value_error_reading_the_events_answer_is_an_invalid_answer(
    ehr_source: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever ValueError reading the $events answer raises, it is the invalid-answer path
    (reported once, naming only the error's type), never a 500."""
    recovered = (FIXTURES / "subscription-events-recovered.json").read_bytes()

    def parse(raw: bytes, *args: Any, **kwargs: Any) -> Any:
        if raw == recovered:
            raise ValueError("a value from the payload")
        return validation.parse(raw, *args, **kwargs)

    monkeypatch.setattr(service_module, "parse", parse)
    seen: list[httpx.Request] = []
    ehr_source.ingest.http_client = httpx.AsyncClient(transport=_source(seen))
    await _post(ehr_source, _load("subscription-event-full.json"))
    response = await _post(ehr_source, _load("subscription-event-gap.json"))
    assert response.status_code == 202, response.text
    text = json.dumps(response.json())
    assert "could not be read (ValueError)" in text
    assert "a value from the payload" not in text
    await _post(ehr_source, _heartbeat(10))
    assert len(seen) == 1


async def test_a_handshake_for_a_seen_subscription_starts_counting_again() -> None:
    """Events 1-7 handled, then a handshake (the subscription re-created): the count is reset
    to 0 and written (one more restart), so the new subscription's events 1-7 are processed,
    not answered as already handled."""
    async with running(settings(), observe=(topics.INGEST_SUBSCRIPTIONS,)) as harness:
        await _post(harness, _load("subscription-event-full.json"))
        handshake = await _post(harness, _load("subscription-handshake.json"))
        assert handshake.status_code == 200, handshake.text
        again = await _post(harness, _load("subscription-event-full.json"))
        assert "its events were already handled" not in again.text
        records = [
            SubscriptionEventsHandled.model_validate_json(value)
            for value in harness.published[topics.INGEST_SUBSCRIPTIONS]
        ]
    assert [(r.highest_event_number, r.counting_restarts) for r in records] == [
        (7, 0),
        (0, 1),
        (7, 1),
    ]


async def test_events_beyond_the_recovery_cap_are_named(ehr_source: Harness) -> None:
    """A heartbeat saying 2000 events were sent after 1-7: $events asks for the newest 1000
    (1001-2000); the answer warns that events 8 to 1000 are not asked for, the gap is counted
    as cut, and a late notification of events 8-9 is still processed."""
    seen: list[httpx.Request] = []
    ehr_source.ingest.http_client = httpx.AsyncClient(transport=_source(seen))
    before = _gap_count("cut")
    await _post(ehr_source, _load("subscription-event-full.json"))
    response = await _post(ehr_source, _heartbeat(2000))
    [asked] = seen
    assert dict(asked.url.params)["eventsSinceNumber"] == "1001"
    warnings = [i["diagnostics"] for i in response.json()["issue"] if i["severity"] == "warning"]
    assert any("events 8 to 1000" in w and "not asked for" in w for w in warnings), warnings
    assert _gap_count("cut") == before + 1
    original = _load("subscription-events-recovered.json")
    original["entry"][0]["resource"]["type"] = "event-notification"
    original["entry"][0]["resource"]["eventsSinceSubscriptionStart"] = "2000"
    late = await _post(ehr_source, original)
    assert "its events were already handled" not in late.text


async def test_recovered_events_keep_their_encounters_ward_and_their_warnings(
    ehr_source: Harness,
) -> None:
    """The $events answer's Encounter is in the ICU ward at site North and one of its
    Observations names no patient: the request for the recovered readings says ward icu and
    site North, and the answer carries the Observation's warning."""
    answer_bundle = _load("subscription-events-recovered.json")
    encounter = "https://ehr.st-elsewhere.example/fhir/Encounter/example-subscription-enc"
    ward = "http://terminology.hl7.org/CodeSystem/location-physical-type"
    orphan = json.loads(json.dumps(answer_bundle["entry"][1]))
    orphan["fullUrl"] += "-orphan"
    orphan["resource"]["id"] += "-orphan"
    del orphan["resource"]["subject"]
    for entry in answer_bundle["entry"][1:]:
        entry["resource"]["encounter"] = {"reference": encounter}
    answer_bundle["entry"] += [
        orphan,
        {
            "fullUrl": encounter,
            "resource": {
                "resourceType": "Encounter",
                "id": "example-subscription-enc",
                "status": "in-progress",
                "class": {"code": "IMP"},
                "subject": {"reference": "Patient/example-subscription"},
                "location": [
                    {
                        "location": {"reference": "Location/icu", "display": "icu"},
                        "physicalType": {"coding": [{"system": ward, "code": "wa"}]},
                    }
                ],
                "serviceProvider": {"display": "North"},
            },
            "request": {"method": "PUT", "url": "Encounter/example-subscription-enc"},
            "response": {"status": "200 OK"},
        },
    ]

    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=answer_bundle)

    ehr_source.ingest.http_client = httpx.AsyncClient(transport=httpx.MockTransport(answer))
    await _post(ehr_source, _load("subscription-event-full.json"))
    response = await _post(ehr_source, _load("subscription-event-gap.json"))
    assert response.status_code == 202, response.text
    _, recovered, _ = _requests(ehr_source)
    assert recovered.encounter_reference == encounter
    assert (recovered.source.ward, recovered.source.site) == ("icu", "North")
    assert "no literal Patient reference" in json.dumps(response.json())


async def test_inbound_topic_recovers_missed_events(ehr_source: Harness) -> None:
    """The same on medmesh.fhir.inbound: event 10 after 1-7 recovers 8-9 before it commits."""
    seen: list[httpx.Request] = []
    ehr_source.ingest.http_client = httpx.AsyncClient(transport=_source(seen))
    await ehr_source.inbound((FIXTURES / "subscription-event-full.json").read_bytes())
    await ehr_source.inbound((FIXTURES / "subscription-event-gap.json").read_bytes())
    assert len(seen) == 1
    _, recovered, notified = _requests(ehr_source)
    assert _inputs(recovered)["respiratory_rate"] == 20
    assert _inputs(notified)["heart_rate"] == 104


async def test_notification_answered_503_is_not_taken_for_a_duplicate(
    ehr_source: Harness,
) -> None:
    """Kafka refuses the commit of events 1-7 (503): the highest event handled does not move,
    so the sender's resend is processed (202), not acknowledged as already handled."""
    ehr_source.kafka.fail_sends = 1
    first = await _post(ehr_source, _load("subscription-event-full.json"))
    assert first.status_code == 503
    resent = await _post(ehr_source, _load("subscription-event-full.json"))
    assert resent.status_code == 202, resent.text
    assert len(_requests(ehr_source)) == 1


async def test_handled_event_numbers_are_kept_on_kafka_and_found_after_a_restart() -> None:
    """Once events 1-7 are committed, their highest number (7) is published on
    medmesh.ingest.subscriptions; an ingest that read it back (a restart) finds events 8-9
    missing when event 10 comes, where one that did not takes event 10 as its first."""
    async with running(settings(), observe=(topics.INGEST_SUBSCRIPTIONS,)) as first:
        assert (await _post(first, _load("subscription-event-full.json"))).status_code == 202
        records = first.published[topics.INGEST_SUBSCRIPTIONS]
    [written] = [SubscriptionEventsHandled.model_validate_json(value) for value in records]
    assert (written.source_system, written.subscription, written.highest_event_number) == (
        "default",
        f"{BASE}/Subscription/medmesh-vitals",
        7,
    )
    counter = SimpleNamespace(
        topic=topics.INGEST_SUBSCRIPTIONS, partition=0, offset=0, key=b"k", value=records[0]
    )
    answers = {}
    for learned in (True, False):
        async with running(settings()) as restarted:
            if learned:
                ingest = restarted.ingest
                follower = ReadingsFollower(
                    ingest.store, ingest.settings, ingest.service.subscriptions
                )
                follower.apply_record(counter)
            response = await _post(restarted, _load("subscription-event-gap.json"))
            # 200: the restarted instance holds no readings state (nothing to rebuild it from).
            assert response.status_code == 200, response.text
            answers[learned] = json.dumps(response.json())
    assert "events 8 to 9" in answers[True]
    assert "never arrived" not in answers[False]


async def test_a_number_already_held_is_not_written_again(ehr_source: Harness) -> None:
    """A resent notification (events already handled) and a heartbeat that moves nothing write
    no counter record; a counter record that does not parse is skipped when read back."""
    async with running(settings(), observe=(topics.INGEST_SUBSCRIPTIONS,)) as harness:
        await _post(harness, _load("subscription-event-full.json"))
        await _post(harness, _load("subscription-event-full.json"))
        await _post(harness, _heartbeat(7))
        assert len(harness.published[topics.INGEST_SUBSCRIPTIONS]) == 1
        ingest = harness.ingest
        follower = ReadingsFollower(ingest.store, ingest.settings, ingest.service.subscriptions)
        follower.apply_record(
            SimpleNamespace(
                topic=topics.INGEST_SUBSCRIPTIONS, partition=0, offset=1, key=b"k", value=b"{"
            )
        )
    assert follower.skipped == 1
