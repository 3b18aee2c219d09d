"""Subscription notifications as EHRs send them: the Bundle rules of a history notification,
R4B's subscription-notification type, the event counters read in R4, R4B and R5, and the pure
logic that finds missed events from them (medmesh_ingest.subscriptions)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from medmesh_contracts.events import FhirVersion, Producer
from medmesh_ingest.fetch import SourceServer, events_url
from medmesh_ingest.outcomes import FhirRejected
from medmesh_ingest.service import SourceRefusedError
from medmesh_ingest.subscriptions import (
    MAX_RECOVERED_EVENTS,
    MAX_UNRECOVERED_RANGES,
    Gap,
    SubscriptionProgress,
    progress,
    subscription_id,
)
from medmesh_ingest.validation import Limits, parse

FIXTURES = Path(__file__).parents[1] / "fixtures" / "fhir"
SUBSCRIPTION = "https://ehr.st-elsewhere.example/fhir/Subscription/medmesh-vitals"


def fixture(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text())


def rejection(payload: dict[str, Any], version: FhirVersion = "R4B") -> FhirRejected:
    with pytest.raises(FhirRejected) as caught:
        parse(json.dumps(payload).encode(), None, version, Limits())
    return caught.value


def _issues(rejected: FhirRejected) -> list[dict[str, Any]]:
    return list(rejected.outcome["issue"])


# --- bdl-3 / bdl-4 ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "version"),
    [("subscription-event-full.json", "R4B"), ("r4-subscription-event-full.json", "R4")],
)
@pytest.mark.parametrize(("element", "rule"), [("request", "bdl-3"), ("response", "bdl-4")])
def test_history_entry_without_request_or_response_is_refused(
    name: str, version: FhirVersion, element: str, rule: str
) -> None:
    """A history notification whose entry lacks request (bdl-3) or response (bdl-4) is 422,
    naming the entry's index and the rule, never a value of the entry."""
    bundle = fixture(name)
    del bundle["entry"][3][element]
    rejected = rejection(bundle, version)
    assert rejected.status == 422
    [issue] = _issues(rejected)
    assert issue["expression"] == [f"Bundle.entry[3].{element}"]
    assert rule in issue["diagnostics"]
    assert "example-subscription" not in json.dumps(rejected.outcome)


def test_the_status_entry_needs_request_and_response_too() -> None:
    """The SubscriptionStatus entry of a history Bundle is an entry like the others: both
    missing are two issues at entry 0."""
    bundle = fixture("subscription-heartbeat.json")
    del bundle["entry"][0]["request"], bundle["entry"][0]["response"]
    expressions = [i["expression"][0] for i in _issues(rejection(bundle))]
    assert expressions == ["Bundle.entry[0].request", "Bundle.entry[0].response"]


def test_subscription_notification_entries_need_neither() -> None:
    """A subscription-notification Bundle (R5) may leave request and response out."""
    payload = parse((FIXTURES / "r5-subscription-notification.json").read_bytes(), None, "R5")
    assert payload.notification is not None
    assert payload.notification.type == "event-notification"


# --- R4B's subscription-notification type -------------------------------------------------------


def test_r4b_reads_the_subscription_notification_bundle_type() -> None:
    """R4B has the subscription-notification Bundle type: a SubscriptionStatus-first Bundle of
    that type is a notification in R4B, with its counters."""
    bundle = fixture("subscription-event-full.json")
    bundle["type"] = "subscription-notification"
    payload = parse(json.dumps(bundle).encode(), None, "R4B")
    assert payload.notification is not None
    assert payload.notification.event_numbers == (1, 2, 3, 4, 5, 6, 7)


def test_r4_has_no_subscription_notification_bundle_type() -> None:
    """R4's bundle-type value set has no subscription-notification: 422 at Bundle.type."""
    bundle = fixture("r4-subscription-event-full.json")
    bundle["type"] = "subscription-notification"
    [issue] = _issues(rejection(bundle, "R4"))
    assert issue["expression"] == ["Bundle.type"]


# --- a Parameters-first notification read as R4B ------------------------------------------------


def test_r4_status_sent_without_fhir_version_says_what_to_send() -> None:
    """The backport IG's R4 Parameters first, read as R4B (no fhirVersion): 422 saying the
    first entry is the R4 status and naming fhirVersion=4.0 as the fix."""
    [issue] = _issues(rejection(fixture("r4-subscription-event-full.json"), "R4B"))
    assert issue["expression"] == ["Bundle.entry[0].resource"]
    text = issue["diagnostics"]
    assert "backport-subscription-status-r4" in text
    assert "fhirVersion=4.0" in text
    assert "read as R4B" in text


# --- event counters -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "version"),
    [
        ("subscription-event-full.json", "R4B"),
        ("r4-subscription-event-full.json", "R4"),
        ("r5-subscription-notification.json", "R5"),
    ],
)
def test_event_counters_are_read_in_every_version(name: str, version: FhirVersion) -> None:
    """The subscription, eventsSinceSubscriptionStart and each event's number are read from
    the R4B / R5 SubscriptionStatus and the R4 backport Parameters alike."""
    payload = parse((FIXTURES / name).read_bytes(), None, version)
    notification = payload.notification
    assert notification is not None
    assert notification.subscription == SUBSCRIPTION
    assert notification.events_since_start == 7
    assert notification.event_numbers == (1, 2, 3, 4, 5, 6, 7)


def test_a_counter_that_is_not_a_number_is_refused_without_its_value() -> None:
    """An eventNumber that is not a whole number is 422 at the element; the value is not
    echoed."""
    bundle = fixture("subscription-event-full.json")
    bundle["entry"][0]["resource"]["notificationEvent"][2]["eventNumber"] = "-3x"
    [issue] = _issues(rejection(bundle))
    assert issue["expression"] == ["Bundle.entry[0].resource.notificationEvent[2].eventNumber"]
    assert "-3x" not in issue["diagnostics"]


@pytest.mark.parametrize("counter", ["\u00b2", "\u0663", "1\u00b2", "", "12345678901234567890"])
@pytest.mark.parametrize(
    "path", ["notificationEvent[2].eventNumber", "eventsSinceSubscriptionStart"]
)
def test_a_counter_of_other_digits_is_refused(counter: str, path: str) -> None:
    """A counter of digits other than ASCII 0-9 (a superscript two, an Arabic-Indic three),
    empty, or over 19 digits is 422 at the element, never a crash (ValueError) or a number."""
    bundle = fixture("subscription-event-full.json")
    status = bundle["entry"][0]["resource"]
    if path == "eventsSinceSubscriptionStart":
        status[path] = counter
    else:
        status["notificationEvent"][2]["eventNumber"] = counter
    [issue] = _issues(rejection(bundle))
    assert issue["expression"] == [f"Bundle.entry[0].resource.{path}"]


# --- the gap logic ------------------------------------------------------------------------------


def _progress(
    highest: int | None,
    numbers: tuple[int, ...] = (),
    since: int | None = None,
    kind: str = "",
    unrecovered: tuple[Gap, ...] = (),
) -> Any:
    return progress(
        highest,
        notification_type=kind or ("event-notification" if numbers else "heartbeat"),
        events_since_start=since,
        event_numbers=numbers,
        unrecovered=unrecovered,
    )


def test_first_notification_sets_where_counting_starts() -> None:
    """A subscription never seen: no gap (its history is not asked for), counting from its
    highest number."""
    found = _progress(None, (12, 13), since=13)
    assert (found.gap, found.stale, found.highest) == (None, False, 13)


def test_first_handshake_starts_at_its_counter() -> None:
    """A handshake of a new subscription starts the count at 0 (or at its counter)."""
    assert _progress(None, kind="handshake").highest == 0
    assert _progress(None, since=4, kind="handshake").highest == 4


def test_next_events_in_order_are_no_gap() -> None:
    """Events following the highest handled, with a matching counter: nothing missing."""
    found = _progress(7, (8, 9), since=9)
    assert (found.gap, found.stale, found.highest) == (None, False, 9)


def test_a_jump_in_event_numbers_is_a_gap() -> None:
    """Event 10 after 7: events 8 and 9 are missing."""
    found = _progress(7, (10,), since=10)
    assert found.gap == Gap(8, 9)
    assert found.highest == 10


def test_a_hole_between_the_notifications_own_events_is_a_gap() -> None:
    """Events 8 and 11 in one notification: 9 and 10 are missing."""
    assert _progress(7, (8, 11), since=11).gap == Gap(9, 10)


def test_a_heartbeat_counter_beyond_the_highest_is_a_gap() -> None:
    """A heartbeat saying 9 events were sent, 7 handled: 8 and 9 are missing."""
    found = _progress(7, since=9)
    assert found.gap == Gap(8, 9)
    assert not found.stale


def test_a_counter_beyond_the_notifications_events_is_a_gap() -> None:
    """Events 8-9 carried, but 11 sent: 10 and 11 are missing (sent after, not received)."""
    assert _progress(7, (8, 9), since=11).gap == Gap(10, 11)


def test_events_already_handled_are_stale() -> None:
    """A notification with only events at or below the highest (a late original, a resend)
    is stale and moves nothing."""
    found = _progress(9, (8, 9), since=9)
    assert (found.gap, found.stale, found.highest) == (None, True, 9)


def test_a_heartbeat_is_never_stale() -> None:
    """A notification without numbered events is not stale, whatever its counter."""
    assert not _progress(9, since=5).stale


def test_a_huge_gap_asks_for_the_newest_events_only() -> None:
    """A counter far beyond the highest asks for at most MAX_RECOVERED_EVENTS events, the
    newest."""
    gap = _progress(7, since=1_000_000).gap
    assert gap == Gap(1_000_000 - MAX_RECOVERED_EVENTS + 1, 1_000_000)
    assert gap.size == MAX_RECOVERED_EVENTS


def test_the_events_beyond_the_cap_are_named() -> None:
    """The older part of a gap over MAX_RECOVERED_EVENTS is the cut range (never asked for);
    a gap within the cap has none."""
    found = _progress(7, since=1_000_000)
    assert found.cut == Gap(8, 1_000_000 - MAX_RECOVERED_EVENTS)
    assert _progress(7, since=7 + MAX_RECOVERED_EVENTS).cut is None
    assert _progress(7, since=8 + MAX_RECOVERED_EVENTS).cut == Gap(8, 8)


def test_progress_never_moves_back() -> None:
    """The highest handled only grows, per source and subscription."""
    store = SubscriptionProgress()
    store.advance("ehr", SUBSCRIPTION, 9)
    store.advance("ehr", SUBSCRIPTION, 4)
    store.advance("other", SUBSCRIPTION, 2)
    assert store.highest("ehr", SUBSCRIPTION) == 9
    assert store.highest("other", SUBSCRIPTION) == 2
    assert store.highest("ehr", "Subscription/else") is None


def test_events_url_is_on_the_source_server_only() -> None:
    """$events is asked of the subscription on the source's server; a subscription elsewhere
    (or not a Subscription) gives no URL."""
    base = "https://ehr.st-elsewhere.example/fhir"
    assert events_url(base, SUBSCRIPTION) == f"{SUBSCRIPTION}/$events"
    assert events_url(base, "Subscription/abc") == f"{base}/Subscription/abc/$events"
    assert events_url(base, "https://evil.example/fhir/Subscription/abc") is None
    assert events_url(base, "Observation/abc") is None
    assert subscription_id(SUBSCRIPTION) == "medmesh-vitals"


# --- unrecovered ranges -------------------------------------------------------------------------

PRODUCER = Producer(service="ingest", instance="test")


def test_a_late_event_in_an_unrecovered_range_is_fresh() -> None:
    """Events 8-9 missed and not recovered (highest 10): a late event 8 is not stale; it fills
    that number, and the count stays at 10."""
    found = _progress(10, (8,), since=10, unrecovered=(Gap(8, 9),))
    assert (found.gap, found.stale, found.highest, found.filled) == (None, False, 10, (8,))
    assert _progress(10, (7,), since=10, unrecovered=(Gap(8, 9),)).stale


def test_lost_ranges_are_kept_until_their_events_are_handled() -> None:
    """A lost range is held below the highest number; handling one of its events takes only
    that number out; the ranges are kept in the record written to Kafka and learned back."""
    store = SubscriptionProgress()
    store.advance("ehr", SUBSCRIPTION, 7)
    assert store.advance("ehr", SUBSCRIPTION, 20, lost=(Gap(8, 12),))
    assert store.unrecovered("ehr", SUBSCRIPTION) == (Gap(8, 12),)
    assert store.advance("ehr", SUBSCRIPTION, 20, filled=(10,))
    assert store.unrecovered("ehr", SUBSCRIPTION) == (Gap(8, 9), Gap(11, 12))
    assert not store.advance("ehr", SUBSCRIPTION, 20, filled=(10,))
    record = store.record("ehr", SUBSCRIPTION, "c", PRODUCER)
    assert record is not None
    restarted = SubscriptionProgress()
    restarted.learn(record)
    assert restarted.highest("ehr", SUBSCRIPTION) == 20
    assert restarted.unrecovered("ehr", SUBSCRIPTION) == (Gap(8, 9), Gap(11, 12))
    # Its own older record read back after event 8 was handled does not bring 8 back.
    store.advance("ehr", SUBSCRIPTION, 20, filled=(8,))
    store.learn(record)
    assert store.unrecovered("ehr", SUBSCRIPTION) == (Gap(9, 9), Gap(11, 12))


def test_unrecovered_ranges_are_bounded() -> None:
    """At most MAX_UNRECOVERED_RANGES ranges per subscription, the newest kept."""
    store = SubscriptionProgress()
    for n in range(MAX_UNRECOVERED_RANGES + 5):
        store.advance("ehr", SUBSCRIPTION, 3 * n + 3, lost=(Gap(3 * n + 1, 3 * n + 1),))
    held = store.unrecovered("ehr", SUBSCRIPTION)
    assert len(held) == MAX_UNRECOVERED_RANGES
    assert held[-1] == Gap(
        3 * (MAX_UNRECOVERED_RANGES + 4) + 1, 3 * (MAX_UNRECOVERED_RANGES + 4) + 1
    )


# --- a handshake for a subscription already seen -------------------------------------------------


def test_a_handshake_for_a_seen_subscription_restarts_its_count() -> None:
    """A handshake after events up to 40: the count starts again at its counter (0 absent),
    no gap asked for."""
    found = _progress(40, kind="handshake")
    assert (found.gap, found.stale, found.highest, found.reset) == (None, False, 0, True)
    assert _progress(40, since=3, kind="handshake").highest == 3
    assert not _progress(None, kind="handshake").reset


def test_a_restarted_count_replaces_a_higher_number_of_the_count_before() -> None:
    """After a reset, the low number and empty ranges are held; its record (one more
    restart) replaces a higher number elsewhere, while a record of the count before is
    ignored."""
    store = SubscriptionProgress()
    store.advance("ehr", SUBSCRIPTION, 40, lost=(Gap(30, 35),))
    before = store.record("ehr", SUBSCRIPTION, "c", PRODUCER)
    store.reset("ehr", SUBSCRIPTION, 0)
    assert (store.highest("ehr", SUBSCRIPTION), store.unrecovered("ehr", SUBSCRIPTION)) == (0, ())
    after = store.record("ehr", SUBSCRIPTION, "c", PRODUCER)
    assert before is not None
    assert after is not None
    assert after.counting_restarts == 1
    other = SubscriptionProgress()
    other.learn(before)
    other.learn(after)
    assert other.highest("ehr", SUBSCRIPTION) == 0
    other.learn(before)
    assert other.highest("ehr", SUBSCRIPTION) == 0
    assert other.unrecovered("ehr", SUBSCRIPTION) == ()


# --- the source's answers are read up to the size limit -----------------------------------------


class _Chunks(httpx.AsyncByteStream):
    """An answer of ``count`` chunks of 1 KiB, counting how many were read."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.read = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for _ in range(self.count):
            self.read += 1
            yield b" " * 1024


async def test_an_answer_over_the_size_limit_is_not_read_whole() -> None:
    """A 1 MiB answer (no Content-Length) against a 10 KiB limit: refused once past the
    limit, having read a dozen chunks, not all 1024."""
    stream = _Chunks(1024)
    transport = httpx.MockTransport(lambda _: httpx.Response(200, stream=stream))
    async with httpx.AsyncClient(transport=transport) as client:
        server = SourceServer("https://ehr.example/fhir", None, 5.0, 10 * 1024, client)
        with pytest.raises(SourceRefusedError, match="size limit"):
            await server.get("https://ehr.example/fhir/Observation/o-1", "fetching")
    assert stream.read <= 12


async def test_an_answer_declaring_a_length_over_the_limit_is_not_read() -> None:
    """A Content-Length over the limit is refused before a byte of the body is read; one
    within it is read whole."""
    stream = _Chunks(20)
    transport = httpx.MockTransport(
        lambda _: httpx.Response(200, stream=stream, headers={"content-length": "20480"})
    )
    async with httpx.AsyncClient(transport=transport) as client:
        server = SourceServer("https://ehr.example/fhir", None, 5.0, 10 * 1024, client)
        with pytest.raises(SourceRefusedError):
            await server.get("https://ehr.example/fhir/Observation/o-1", "fetching")
        assert stream.read == 0
        roomy = SourceServer("https://ehr.example/fhir", None, 5.0, 20 * 1024, client)
        assert len(await roomy.get("https://ehr.example/fhir/Observation/o-1", "fetching")) == 20480


# --- bounded memory -----------------------------------------------------------------------------


def test_a_subscription_is_held_by_its_id() -> None:
    """An absolute and a relative reference to one Subscription are one count."""
    store = SubscriptionProgress()
    store.advance("ehr", SUBSCRIPTION, 9)
    assert store.highest("ehr", "Subscription/medmesh-vitals") == 9
    assert len(store) == 1


def test_the_least_recently_updated_subscription_is_forgotten_beyond_the_cap() -> None:
    """Beyond max_entries the least recently updated subscription is forgotten (counted); one
    updated since stays."""
    store = SubscriptionProgress(max_entries=3)
    for n in range(3):
        store.advance("ehr", f"Subscription/s{n}", 1)
    store.advance("ehr", "Subscription/s0", 2)  # s1 is now the least recently updated
    store.advance("ehr", "Subscription/s3", 1)
    assert len(store) == 3
    assert store.evicted == 1
    assert store.highest("ehr", "Subscription/s1") is None
    assert store.highest("ehr", "Subscription/s0") == 2
