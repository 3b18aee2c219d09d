"""Missed Subscription notifications: found from the event counters, asked for again.

A source numbers the events of each subscription (the Subscriptions backport IG and R5:
``notificationEvent.eventNumber``, and ``eventsSinceSubscriptionStart`` on every notification,
heartbeats and handshakes included). Ingest keeps, per source and subscription, the highest
event number it has handled. A notification whose numbers jump past it, or whose
``eventsSinceSubscriptionStart`` exceeds it, shows events that never arrived (lost on the way,
sent while ingest answered 5xx and given up by the source); ``progress`` says which. The service
then asks the source for them with the IG's ``$events`` operation and processes them as if
notified (``service.IngestService``). Events at or below the highest number are not handled
twice: a notification carrying only those (a late original, a resend) is acknowledged, nothing
else. The exception are the unrecovered ranges: events missed that the source could not give
again for good (no server, no ``$events``, an invalid answer, beyond MAX_RECOVERED_EVENTS). The
count moves past them, but they are kept (a few ranges per subscription), so a late
notification of one is processed, and that number then counts as handled.

The first notification seen of a subscription sets where counting starts (nothing before it is
asked for: that may be the subscription's whole history; a handshake starts at its counter, 0
for a new subscription). A handshake for a subscription already seen starts its counting again
(re-created, or its source restored: its numbers start again), at its counter. The highest number moves only once what the notification caused is
committed to Kafka, so a notification answered 503 and resent is not taken for a duplicate.

The numbers are held in memory (``SubscriptionProgress``) and kept on the compacted topic
medmesh.ingest.subscriptions (``SubscriptionEventsHandled``, keyed by source and subscription),
written once what the events caused is committed and read back on start (and followed, so an
instance sees what the others handled): a gap that spans a restart is still found. The write
follows the commit rather than joining its transaction, so the topic can only lag behind what
was handled, never lead: after a crash between the two, the next notification asks for events
that were in fact handled, and their readings, already in the patients' states, send nothing
again.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from opentelemetry.metrics import Counter

from medmesh_contracts.events import EventNumberRange, Producer, SubscriptionEventsHandled
from medmesh_runtime.logging import get_logger
from medmesh_runtime.metrics import meter

# Most events asked for in one recovery: a source that restarted its numbering (or a wrong
# counter) must not make ingest ask for millions of events at once. Beyond it the newest are
# asked for and the rest is reported as lost.
MAX_RECOVERED_EVENTS = 1000
# Most unrecovered ranges kept per subscription (events missed that the source could not give
# again, still taken if they come late); beyond it the oldest are forgotten.
MAX_UNRECOVERED_RANGES = 32
# Most subscriptions whose counting is held (per ingest instance, all sources together).
MAX_SUBSCRIPTIONS = 10_000
log = get_logger("medmesh.ingest.subscriptions")


@dataclass(frozen=True)
class Gap:
    """Events a subscription's source sent that were not received: ``first`` to ``last``."""

    first: int
    last: int

    @property
    def size(self) -> int:
        """How many events are missing."""
        return self.last - self.first + 1


@dataclass(frozen=True)
class Progress:
    """What one notification's counters say, against the highest event number handled."""

    # Events missed before (or between) this notification's, to ask the source for.
    gap: Gap | None
    # The notification carries numbered events and all of them were already handled.
    stale: bool
    # The highest event number once this notification (and the gap) is handled.
    highest: int | None
    # This notification's events that lie in the subscription's unrecovered ranges (missed
    # once, never handled): handled with it, they leave the ranges.
    filled: tuple[int, ...] = ()
    # A handshake for a subscription already seen: its counting starts again at ``highest``.
    reset: bool = False
    # Missed events older than the MAX_RECOVERED_EVENTS newest of a gap: never asked for.
    cut: Gap | None = None


def progress(
    highest: int | None,
    *,
    notification_type: str,
    events_since_start: int | None,
    event_numbers: tuple[int, ...],
    unrecovered: Sequence[Gap] = (),
) -> Progress:
    """Where a notification stands, given the highest event number handled (None: the
    subscription was never seen) and the ranges below it that were never handled."""
    top_event = max(event_numbers, default=None)
    top = max((n for n in (top_event, events_since_start) if n is not None), default=None)
    if notification_type == "handshake":
        # A handshake opens a subscription's notifications (the backport IG): for one already
        # seen, it was re-created or its source restored, and its numbers start again.
        return Progress(None, False, events_since_start or 0, reset=highest is not None)
    if highest is None:
        return Progress(None, False, top)
    filled = tuple(sorted({n for n in event_numbers if n <= highest and _within(n, unrecovered)}))
    fresh = {n for n in event_numbers if n > highest}
    stale = bool(event_numbers) and not fresh and not filled
    if top is None or top <= highest:
        return Progress(None, stale, highest, filled)
    # The missing events lie between the lowest and highest number neither handled nor here
    # (walked over this notification's own numbers only: bounded by its entries).
    first, last = highest + 1, top
    while first in fresh:
        first += 1
    while last in fresh:
        last -= 1
    if first > last:
        return Progress(None, stale, top, filled)
    asked = max(first, last - MAX_RECOVERED_EVENTS + 1)
    cut = Gap(first, asked - 1) if asked > first else None
    return Progress(Gap(asked, last), stale, top, filled, cut=cut)


def _within(number: int, ranges: Sequence[Gap]) -> bool:
    return any(r.first <= number <= r.last for r in ranges)


def with_lost(ranges: Sequence[Gap], lost: Sequence[Gap]) -> tuple[Gap, ...]:
    """Unrecovered ranges with ``lost`` added: sorted, overlapping or touching ones joined, at
    most MAX_UNRECOVERED_RANGES (the newest kept)."""
    joined: list[Gap] = []
    for r in sorted((*ranges, *lost), key=lambda g: g.first):
        if joined and r.first <= joined[-1].last + 1:
            joined[-1] = Gap(joined[-1].first, max(joined[-1].last, r.last))
        else:
            joined.append(r)
    return tuple(joined[-MAX_UNRECOVERED_RANGES:])


def without_filled(ranges: Sequence[Gap], filled: Sequence[int]) -> tuple[Gap, ...]:
    """Unrecovered ranges with the ``filled`` event numbers (handled at last) taken out."""
    kept = list(ranges)
    for number in filled:
        split: list[Gap] = []
        for r in kept:
            if not r.first <= number <= r.last:
                split.append(r)
                continue
            if r.first < number:
                split.append(Gap(r.first, number - 1))
            if number < r.last:
                split.append(Gap(number + 1, r.last))
        kept = split
    return tuple(kept[-MAX_UNRECOVERED_RANGES:])


def subscription_id(reference: str) -> str | None:
    """The logical id in a Subscription reference (``.../Subscription/<id>``); None when the
    reference names no Subscription."""
    parts = reference.rstrip("/").split("/")
    if len(parts) >= 2 and parts[-2] == "Subscription" and parts[-1]:
        return parts[-1]
    return None


def _key(source: str, subscription: str) -> tuple[str, str]:
    """Where a subscription's counting is held: by source and ``Subscription/<logical id>``
    (the reference itself when it names no Subscription)."""
    logical_id = subscription_id(subscription)
    return source, subscription if logical_id is None else f"Subscription/{logical_id}"


@dataclass
class _Held:
    """One subscription's counting: the highest event number handled and the ranges below it
    that never were."""

    highest: int
    unrecovered: tuple[Gap, ...] = ()
    restarts: int = 0


class SubscriptionProgress:
    """The highest event number handled, per source and subscription, with the ranges below it
    that were missed and could not be had again (unrecovered).

    A subscription is held by its logical id where its reference names one (an absolute and a
    relative reference to it are one subscription), and at most ``max_entries`` are held: the
    least recently updated is forgotten beyond it (counted in ``evicted`` and the
    ``subscription_progress_evicted`` metric, logged with its id), so a sender making up
    subscription references cannot grow ingest's memory. A forgotten subscription's next
    notification starts its count again, as a first one does.
    """

    def __init__(self, max_entries: int = MAX_SUBSCRIPTIONS) -> None:
        self.max_entries = max_entries
        self.evicted = 0
        self._held: OrderedDict[tuple[str, str], _Held] = OrderedDict()

    def __len__(self) -> int:
        return len(self._held)

    def highest(self, source: str, subscription: str) -> int | None:
        """The highest event number handled of this subscription; None: never seen."""
        held = self._held.get(_key(source, subscription))
        return None if held is None else held.highest

    def unrecovered(self, source: str, subscription: str) -> tuple[Gap, ...]:
        """Event numbers at or below the highest that were never handled."""
        held = self._held.get(_key(source, subscription))
        return () if held is None else held.unrecovered

    def advance(
        self,
        source: str,
        subscription: str,
        highest: int,
        *,
        lost: Sequence[Gap] = (),
        filled: Sequence[int] = (),
    ) -> bool:
        """Record that events up to ``highest`` are handled (never moves back), but for the
        ``lost`` ranges (missed and not to be had again), and that the ``filled`` numbers of the
        unrecovered ranges are handled at last; whether anything changed (or is its first)."""
        key = _key(source, subscription)
        held = self._held.get(key)
        if held is None:
            self._put(key, _Held(highest, with_lost((), lost)))
            return True
        before = (held.highest, held.unrecovered)
        held.highest = max(held.highest, highest)
        held.unrecovered = without_filled(with_lost(held.unrecovered, lost), filled)
        changed = (held.highest, held.unrecovered) != before
        if changed:
            self._held.move_to_end(key)
        return changed

    def reset(self, source: str, subscription: str, highest: int) -> None:
        """Start the subscription's counting again at ``highest`` (a handshake for one already
        seen), its unrecovered ranges forgotten (numbers of the counting before)."""
        key = _key(source, subscription)
        held = self._held.get(key)
        self._put(key, _Held(highest, (), 0 if held is None else held.restarts + 1))

    def learn(self, handled: SubscriptionEventsHandled) -> None:
        """Take a number read from medmesh.ingest.subscriptions (this or another instance's).

        A record of a later counting (more restarts) replaces what is held; one of an earlier
        counting is ignored. Within one counting a higher number brings its unrecovered ranges
        along; at the same number only the ranges both hold stay (one of the two handled the
        others: this instance's own record, written before it filled one, or another
        instance's later one).
        """
        key = _key(handled.source_system, handled.subscription)
        ranges = tuple(Gap(r.first, r.last) for r in handled.unrecovered)
        held = self._held.get(key)
        restarts = handled.counting_restarts
        if held is None or restarts > held.restarts:
            self._put(key, _Held(handled.highest_event_number, with_lost((), ranges), restarts))
            return
        if restarts < held.restarts:
            return
        if handled.highest_event_number > held.highest:
            held.highest = handled.highest_event_number
            held.unrecovered = with_lost(held.unrecovered, ranges)
        elif handled.highest_event_number == held.highest:
            held.unrecovered = tuple(
                Gap(max(a.first, b.first), min(a.last, b.last))
                for a in held.unrecovered
                for b in ranges
                if max(a.first, b.first) <= min(a.last, b.last)
            )
        self._held.move_to_end(key)

    def _put(self, key: tuple[str, str], held: _Held) -> None:
        """Hold a subscription's counting as the most recently updated, forgetting the least
        recently updated beyond ``max_entries``."""
        self._held[key] = held
        self._held.move_to_end(key)
        while len(self._held) > self.max_entries:
            (source, subscription), _ = self._held.popitem(last=False)
            self.evicted += 1
            progress_evicted_counter().add(1)
            # Subscription ids and source names only (None for a reference naming none).
            log.warning(
                "subscription counting forgotten: too many subscriptions held",
                subscription=subscription_id(subscription),
                source=source,
                held=len(self._held),
            )

    def record(
        self, source: str, subscription: str, correlation_id: str, producer: Producer
    ) -> SubscriptionEventsHandled | None:
        """What to keep on medmesh.ingest.subscriptions for this subscription (``subscription``:
        its reference as notified) now (None: not held)."""
        held = self._held.get(_key(source, subscription))
        if held is None:
            return None
        return SubscriptionEventsHandled(
            correlation_id=correlation_id,
            producer=producer,
            source_system=source,
            subscription=subscription,
            highest_event_number=held.highest,
            unrecovered=tuple(
                EventNumberRange(first=r.first, last=r.last) for r in held.unrecovered
            ),
            counting_restarts=held.restarts,
        )


@functools.cache
def gaps_counter() -> Counter:
    """Missed-event gaps found, by outcome (recovered / failed; cut: the part of a gap beyond
    MAX_RECOVERED_EVENTS, never asked for); no subscription or patient
    label: which subscription is in the log line."""
    # Built once: OpenTelemetry's proxy meter binds it to the provider once metrics are set up.
    return meter("medmesh.ingest").create_counter(
        "medmesh.ingest.subscription_gaps",
        unit="{gap}",
        description="Subscription notifications found missing from the event counters, by "
        "whether the source gave them again ($events)",
    )


@functools.cache
def progress_not_kept_counter() -> Counter:
    """Subscription event numbers handled but not written to medmesh.ingest.subscriptions."""
    return meter("medmesh.ingest").create_counter(
        "medmesh.ingest.subscription_progress_unsaved",
        unit="{write}",
        description="Subscription event numbers handled but not kept on Kafka (Kafka did not "
        "take the write in time); the next number written replaces them",
    )


@functools.cache
def progress_evicted_counter() -> Counter:
    """Subscriptions whose counting was forgotten (more than MAX_SUBSCRIPTIONS held)."""
    return meter("medmesh.ingest").create_counter(
        "medmesh.ingest.subscription_progress_evicted",
        unit="{subscription}",
        description="Subscriptions whose event counting was forgotten, the least recently "
        "updated, beyond the most held; their next notification starts counting again",
    )
