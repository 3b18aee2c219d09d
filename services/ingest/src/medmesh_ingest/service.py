"""What ingest does with FHIR payloads, whatever transport brought them.

``IngestService.prepare`` parses and checks a payload, fetches the content of id-only
Subscription notifications and extracts readings and orders; ``apply`` merges prepared payloads
into each patient's state (``readings.merge``) and publishes the requests and the new states.
``handle`` does both for one payload (an HTTP call); the inbound-topic consumer prepares a
partition's poll and applies it at once, so a poll's messages go to Kafka together, in one
transaction with the poll's offsets. Its I/O is injected at one bootstrap point
(``app.create_app``): the publish function (``apply`` takes another for one call) and the
fetcher.

Over HTTP (``Context.answer_bundles``) a batch or transaction Bundle is answered with a
batch-response or transaction-response Bundle (``bundle_response``): a batch's entries are
checked each on its own (an invalid one is set aside with its own 4xx, the others go on); a
transaction is all or nothing (any invalid entry rejects it, nothing is sent). Either is
answered 200 only once what it caused is committed to Kafka, like every payload.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

from medmesh_contracts.events import (
    FhirVersion,
    PatientReadingsUpdated,
    Producer,
    RequestInference,
    SourceContext,
    SubscriptionEventsHandled,
    new_id,
)
from medmesh_contracts.modelspec import ModelSpec
from medmesh_ingest.bundle_response import BundleReply, response_bundle
from medmesh_ingest.extraction import NO_PACS, Extraction, Order, PatientReadings, extract
from medmesh_ingest.imaging import PacsPolicy
from medmesh_ingest.locations import Placement, placements
from medmesh_ingest.outcomes import INVALID_FHIR, FhirRejected, Issue, outcome
from medmesh_ingest.readings import Merged, ReadingsStore, merge, state_key
from medmesh_ingest.subscriptions import (
    MAX_RECOVERED_EVENTS,
    Gap,
    SubscriptionProgress,
    gaps_counter,
    progress,
    progress_not_kept_counter,
    subscription_id,
)
from medmesh_ingest.validation import (
    Limits,
    Notification,
    Payload,
    entry_failures,
    entry_of,
    parse,
)
from medmesh_runtime.logging import get_logger

# Commits requests (each with its payload's tracing context) and new patient states in one
# Kafka transaction, all or none (it raises when none), for the first ``payloads`` payloads
# given to ``apply``; returns each state's offset on its topic (None: not known).
Publish = Callable[
    [Sequence["Outgoing"], Sequence[PatientReadingsUpdated], int],
    Awaitable[Sequence[int | None]],
]
# Fetches resources named by an id-only notification: (references, version) -> raw JSON each.
Fetch = Callable[[Sequence[str]], Awaitable[list[bytes]]]
# Asks the source for a subscription's events it sent but ingest did not receive (the
# backport IG's $events): (the Subscription's reference, first, last event number) -> the
# raw JSON of the notification Bundle the source answers with.
Recover = Callable[[str, int, int], Awaitable[bytes]]
# Keeps a subscription's highest handled event number on medmesh.ingest.subscriptions (raises
# when Kafka did not take it).
RecordProgress = Callable[[SubscriptionEventsHandled], Awaitable[None]]

# Notification types that carry no clinical content: acknowledged, nothing else.
_ACKNOWLEDGED_ONLY = frozenset({"handshake", "heartbeat", "query-status"})
_LOCK_STRIPES = 256
log = get_logger("medmesh.ingest.service")


class SourceUnavailableError(Exception):
    """The source FHIR server could not give the resources a notification named."""


class SourceRefusedError(SourceUnavailableError):
    """The source FHIR server's answer will not change if asked again: a 4xx other than 408
    and 429 (a server without ``$events`` answers 404, 405 or 501, also counted here), an
    answer over the size limit, a subscription that is not on the server. An id-only fetch
    still answers the sender 503 (its resend may name other resources); a recovery reports the
    gap once and moves past it."""


class KafkaUnavailableError(Exception):
    """Kafka did not acknowledge a message in time: nothing may be reported as accepted."""


@dataclass(frozen=True)
class Context:
    """Where a payload came from and how to read it."""

    source: SourceContext
    fhir_version: FhirVersion = "R4B"
    resource_type_hint: str | None = None
    # How to fetch id-only notification content from the sender's FHIR server (None: cannot).
    fetch: Fetch | None = None
    # How to ask the sender's FHIR server for missed notifications (None: cannot).
    recover: Recover | None = None
    # The caller's tracing context, handed back with each request the payload causes (the
    # requests of a poll are published after its events were handled, each in its own trace).
    trace: object | None = None
    # Answer batch and transaction Bundles with a batch-response / transaction-response Bundle,
    # a batch's entries each on its own (HTTP); otherwise (the inbound topic, which answers
    # nobody) every payload is taken or rejected as a whole.
    answer_bundles: bool = False


@dataclass(frozen=True)
class Answer:
    """What to tell the sender: an HTTP status and an OperationOutcome, and what was sent.

    ``bundle``: for a batch or transaction answered entry by entry, the batch-response or
    transaction-response Bundle to send instead of the OperationOutcome (which then only sums
    the payload up, for logs).
    """

    status: int
    operation_outcome: dict[str, Any]
    requests: tuple[RequestInference, ...] = ()
    issues: tuple[Issue, ...] = field(default=())
    bundle: dict[str, Any] | None = None

    @property
    def rejected(self) -> bool:
        """True when the payload was not acceptable FHIR (a 4xx answer)."""
        return 400 <= self.status < 500

    @property
    def body(self) -> dict[str, Any]:
        """The FHIR resource to answer with: the response Bundle, else the OperationOutcome."""
        return self.bundle if self.bundle is not None else self.operation_outcome


@dataclass(frozen=True)
class Outgoing:
    """A request to publish, with the tracing context of the payload that caused it."""

    request: RequestInference
    trace: object | None


@dataclass(frozen=True)
class _Group:
    """One patient's readings and orders for one model, within one payload."""

    pseudonym: str
    spec: ModelSpec
    found: PatientReadings | None
    orders: tuple[Order, ...]
    # The patient's reference in the payload (for the entries of a response Bundle).
    subject: str = ""

    @property
    def key(self) -> str:
        return state_key(self.pseudonym, self.spec.name)


@dataclass(frozen=True)
class Prepared:
    """A payload parsed, checked and extracted: what is left is to merge it (``apply``)."""

    context: Context
    received_at: datetime
    groups: tuple[_Group, ...]
    issues: tuple[Issue, ...]
    # A batch or transaction to answer with a response Bundle (None: an OperationOutcome).
    reply: BundleReply | None = None
    # The ward and site each Encounter of the payload names, by its reference.
    placements: Mapping[str, Placement] = field(default_factory=dict)
    # A notification's subscription and the highest event number handled once this payload
    # is committed (None: not a numbered notification).
    handled: _Handled | None = None


@dataclass(frozen=True)
class _Handled:
    """Events of a subscription handled up to ``highest``, once the payload is committed:
    but for the ``lost`` ranges (missed, and the source cannot give them again), and with the
    ``filled`` numbers of its unrecovered ranges handled at last."""

    source: str
    subscription: str
    highest: int
    lost: tuple[Gap, ...] = ()
    filled: tuple[int, ...] = ()
    # A handshake for a subscription already seen: counting starts again at ``highest``.
    reset: bool = False


@dataclass
class _Pending:
    """What payloads merged under their patients' locks caused, not yet published: the
    requests, and each touched patient's newest state (seen by the next payload's merge)."""

    requests: list[Outgoing] = field(default_factory=list)
    states: dict[str, PatientReadingsUpdated] = field(default_factory=dict)
    # The stored state each new state was merged on top of (None: there was none).
    bases: dict[str, PatientReadingsUpdated | None] = field(default_factory=dict)
    keys: set[str] = field(default_factory=set)


class IngestService:
    """The application service: payloads in, requests and state updates out."""

    def __init__(
        self,
        *,
        specs: Mapping[str, ModelSpec],
        pseudonymize: Callable[[str], str],
        producer: Producer,
        store: ReadingsStore,
        publish: Publish,
        limits: Limits,
        lookback: timedelta,
        max_fetched: int = 100,
        publish_timeout_s: float = 10.0,
        pacs: PacsPolicy = NO_PACS,
        record_progress: RecordProgress | None = None,
    ) -> None:
        self.specs = specs
        self.pseudonymize = pseudonymize
        self.producer = producer
        self.store = store
        self.publish = publish
        self.limits = limits
        self.lookback = lookback
        self.max_fetched = max_fetched
        self.publish_timeout_s = publish_timeout_s
        # The DICOMweb bases image readings may name (MEDMESH_PACS_URLS).
        self.pacs = pacs
        self._locks = [asyncio.Lock() for _ in range(_LOCK_STRIPES)]
        # Publishes that outlived their timeout (the sender was answered 503) but may still be
        # acknowledged when Kafka is back, per state key; see ``_publish_durably``.
        self._in_doubt: dict[str, asyncio.Future[None]] = {}
        # The highest event number handled per source and subscription (missed notifications).
        self.subscriptions = SubscriptionProgress()
        # None: the numbers are kept in memory only (tests, tools).
        self.record_progress = record_progress

    async def handle(self, raw: bytes, context: Context, received_at: datetime) -> Answer:
        """Everything ingest does with one payload; raises KafkaUnavailableError or
        SourceUnavailableError when the payload could not be taken (the sender retries)."""
        prepared = await self.prepare(raw, context, received_at)
        if isinstance(prepared, Answer):
            return prepared
        (answer,) = await self.apply([prepared])
        return answer

    async def prepare(
        self, raw: bytes, context: Context, received_at: datetime
    ) -> Prepared | Answer:
        """Parse, check and extract one payload (fetching id-only notification content): the
        final Answer when there is nothing to merge (rejected, or only acknowledged).

        Takes no lock and publishes nothing. Raises SourceUnavailableError.
        """
        try:
            payload = parse(
                raw,
                context.resource_type_hint,
                context.fhir_version,
                self.limits,
                isolate_entries=context.answer_bundles,
            )
        except FhirRejected as rejected:
            return Answer(rejected.status, rejected.outcome)
        notes: list[Issue] = []
        notification = payload.notification
        recovered: _Recovered | None = None
        handled: _Handled | None = None
        if notification is not None:
            handled, gap, stale, cut = self._counted(notification, context)
            if stale:
                note = Issue(
                    "information",
                    "duplicate",
                    f"Subscription {notification.type}: its events were already handled; "
                    "nothing was sent again",
                )
                return Answer(200, outcome((note,)), issues=(note,))
            if gap is not None:
                assert notification.subscription is not None  # noqa: S101 -- a gap names one
                if cut is not None:
                    notes.append(self._cut_off(notification.subscription, cut, context))
                recovered, recovery_notes, handled = await self._recover(
                    notification.subscription, gap, context, handled
                )
                notes.extend(recovery_notes)
            if notification.type in _ACKNOWLEDGED_ONLY and recovered is None:
                note = Issue(
                    "information",
                    "informational",
                    f"Subscription {notification.type} acknowledged; nothing to score.",
                )
                await self._keep_progress(self._advance(handled))
                return Answer(200, outcome((*notes, note)), issues=(*notes, note))
            if notification.id_only:
                try:
                    payload, fetched_notes = await self._with_fetched(payload, context)
                except FhirRejected as rejected:
                    return Answer(rejected.status, rejected.outcome)
                notes.extend(fetched_notes)
        pacs = self.pacs.for_source(context.source.source_system)
        extraction = extract(payload.resources, self.specs, pacs)
        if extraction.rejections and payload.bundle_type == "batch" and context.answer_bundles:
            payload, extraction = self._without_impossible(payload, extraction, pacs)
        if extraction.rejections:
            return Answer(INVALID_FHIR, outcome(extraction.rejections))
        reply: BundleReply | None = None
        if context.answer_bundles and payload.bundle_type in ("batch", "transaction"):
            reply = BundleReply(
                "batch" if payload.bundle_type == "batch" else "transaction",
                payload.entries,
                tuple(payload.resources),
                payload.failed,
            )
        groups = self._groups(extraction)
        issues = (*notes, *extraction.issues)
        placed = placements(payload.resources)
        if recovered is not None:
            # The missed events happened before this notification's: merged first, with the
            # wards and sites their Encounters name (the notification's own win for an
            # Encounter both name: newer) and what was found in them.
            groups = (*self._groups(recovered.extraction), *groups)
            issues = (*notes, *recovered.extraction.issues, *extraction.issues)
            placed = {**recovered.placements, **placed}
        return Prepared(context, received_at, groups, issues, reply, placed, handled)

    async def apply(
        self, prepared: Sequence[Prepared], publish: Publish | None = None
    ) -> list[Answer]:
        """Merge the payloads, in order, into their patients' states and publish what they
        caused in one transaction (``publish``, else the service's): every request and every
        new state; the states are kept once it committed. One answer per payload.

        Raises KafkaUnavailableError when that did not happen within the publish timeout, or
        when a payload concerns a patient whose earlier publish is still in doubt: the payloads
        before that one are published first (an inbound poll is redelivered from there and
        finds them already sent).
        """
        stripes = sorted({_stripe(g.pseudonym) for p in prepared for g in p.groups})
        blocked: KafkaUnavailableError | None = None
        answers: list[Answer] = []
        async with contextlib.AsyncExitStack() as held:
            # In one order for everyone (an HTTP Bundle and a poll may share patients).
            for stripe in stripes:
                await held.enter_async_context(self._locks[stripe])
            pending = _Pending()
            for payload in prepared:
                try:
                    for group in payload.groups:
                        self._raise_if_in_doubt(group.key)
                except KafkaUnavailableError as exc:
                    blocked = exc
                    break
                answers.append(self._merge_payload(payload, pending))
            if pending.requests or pending.states:
                await self._publish_durably(pending, publish or self.publish, len(answers))
            advanced = [self._advance(payload.handled) for payload in prepared[: len(answers)]]
        await self._keep_progress(*advanced)
        if blocked is not None:
            raise blocked
        return answers

    def _without_impossible(
        self, payload: Payload, extraction: Extraction, pacs: PacsPolicy
    ) -> tuple[Payload, Extraction]:
        """A batch answered entry by entry: the entries holding impossible values, or imaging
        studies no deployed model can read, set aside (422 each), the others extracted again.
        Unchanged when a rejection is in no entry."""
        found = entry_failures(INVALID_FHIR, extraction.rejections)
        if not found:
            return payload, extraction
        kept = [r for r in payload.resources if entry_of(r.expression) not in found]
        failed = sorted((*payload.failed, *found.values()), key=lambda f: f.index)
        # Impossible values and unreadable studies are found per entry: the kept hold none.
        kept_extraction = extract(kept, self.specs, pacs)
        return replace(payload, resources=kept, failed=tuple(failed)), kept_extraction

    # --- missed notifications -------------------------------------------------------------------

    def _counted(
        self, notification: Notification, context: Context
    ) -> tuple[_Handled | None, Gap | None, bool, Gap | None]:
        """Where a notification stands in its subscription's event numbers: what it handles,
        the events missed before it to ask for, whether it brings only events already handled,
        and the missed events beyond the recovery cap (never asked for)."""
        if notification.subscription is None:
            return None, None, False, None
        source = context.source.source_system or "default"
        found = progress(
            self.subscriptions.highest(source, notification.subscription),
            notification_type=notification.type,
            events_since_start=notification.events_since_start,
            event_numbers=notification.event_numbers,
            unrecovered=self.subscriptions.unrecovered(source, notification.subscription),
        )
        handled = (
            None
            if found.highest is None
            else _Handled(
                source,
                notification.subscription,
                found.highest,
                filled=found.filled,
                reset=found.reset,
                # Never asked for, but taken if they come late.
                lost=() if found.cut is None else (found.cut,),
            )
        )
        return handled, found.gap, found.stale, found.cut

    def _advance(self, handled: _Handled | None) -> _Handled | None:
        """Move a subscription's highest number in memory; what moved, to keep on Kafka."""
        if handled is None:
            return None
        if handled.reset:
            before = self.subscriptions.highest(handled.source, handled.subscription)
            self.subscriptions.reset(handled.source, handled.subscription, handled.highest)
            log.info(
                "subscription counting started again",
                subscription=subscription_id(handled.subscription),
                highest_before=before,
                highest=handled.highest,
            )
            return handled
        moved = self.subscriptions.advance(
            handled.source,
            handled.subscription,
            handled.highest,
            lost=handled.lost,
            filled=handled.filled,
        )
        return handled if moved else None

    async def _keep_progress(self, *advanced: _Handled | None) -> None:
        """Write the numbers that moved to medmesh.ingest.subscriptions, after the commit of
        what their events caused (outside the patients' locks)."""
        if self.record_progress is None:
            return
        for handled in advanced:
            if handled is None:
                continue
            # What is held now, not what this payload moved: of two writes racing, the later
            # one is never behind the earlier.
            event = self.subscriptions.record(
                handled.source, handled.subscription, new_id(), self.producer
            )
            if event is None:
                continue
            try:
                await asyncio.wait_for(self.record_progress(event), self.publish_timeout_s)
            except Exception as exc:  # noqa: BLE001 -- the number is kept in memory; see below
                # Nothing is lost: the payload is committed and answered; the topic lags behind
                # until this subscription's next number is written, and a restart before that
                # asks the source again for events whose readings send nothing twice.
                progress_not_kept_counter().add(1)
                log.warning(
                    "a subscription's event number was not kept on Kafka",
                    subscription=subscription_id(handled.subscription),
                    highest=handled.highest,
                    error=type(exc).__name__,
                )

    async def _recover(
        self, subscription: str, gap: Gap, context: Context, handled: _Handled | None
    ) -> tuple[_Recovered | None, list[Issue], _Handled | None]:
        """The missed events, asked of the source ($events) and extracted as if notified, with
        what to tell the sender. When the source cannot give them, the notification itself is
        still processed and the gap is logged and counted (``failed``). A failure that may pass
        (the server unreachable, an error status) keeps the highest event number before the gap,
        so the next notification asks again; one that will not (no server configured, an answer
        that is not a valid notification, a 4xx or 501, an answer over the size limit) is
        reported once and the count moves past it, the gap kept as unrecovered."""
        where = {
            "subscription": subscription_id(subscription),
            "first_missing": gap.first,
            "last_missing": gap.last,
            "source": context.source.source_system or "default",
        }
        try:
            recovered = await self._recovered(subscription, gap, context)
        except (_RecoveryFailedError, SourceUnavailableError, FhirRejected) as exc:
            reason = _recovery_failure(exc)
            retried = isinstance(exc, SourceUnavailableError) and not isinstance(
                exc, SourceRefusedError
            )
            gaps_counter().add(1, {"outcome": "failed"})
            log.warning(
                "missed subscription events not recovered", reason=reason, retried=retried, **where
            )
            then = (
                "they are asked for again with the next notification"
                if retried
                else "they are not asked for again"
            )
            warning = Issue(
                "warning",
                "incomplete",
                f"events {gap.first} to {gap.last} of this subscription never arrived and could "
                f"not be asked for again ($events: {reason}); {then}",
            )
            # A failure that may pass: not past the gap, so the next notification finds it. One
            # that will not: past it, but its events are kept as unrecovered, so that a late
            # notification of one of them is still processed (not taken for a duplicate).
            if retried:
                return None, [warning], _before(handled, gap)
            lost = None if handled is None else replace(handled, lost=(*handled.lost, gap))
            return None, [warning], lost
        gaps_counter().add(1, {"outcome": "recovered"})
        log.info("missed subscription events recovered", events=gap.size, **where)
        note = Issue(
            "information",
            "informational",
            f"events {gap.first} to {gap.last} of this subscription never arrived: asked for "
            "again from the source ($events) and processed",
        )
        return recovered, [note], handled

    def _cut_off(self, subscription: str, cut: Gap, context: Context) -> Issue:
        """What to say of missed events beyond the recovery cap: the log line and the warning
        name the range (the subscription's id only)."""
        gaps_counter().add(1, {"outcome": "cut"})
        log.warning(
            "missed subscription events beyond the recovery cap not asked for",
            subscription=subscription_id(subscription),
            first_missing=cut.first,
            last_missing=cut.last,
            cap=MAX_RECOVERED_EVENTS,
            source=context.source.source_system or "default",
        )
        return Issue(
            "warning",
            "incomplete",
            f"events {cut.first} to {cut.last} of this subscription never arrived and are "
            f"beyond the {MAX_RECOVERED_EVENTS} newest missed events asked for again: they "
            "are not asked for (a late notification of one is still processed)",
        )

    async def _recovered(self, subscription: str, gap: Gap, context: Context) -> _Recovered:
        """The missed events' readings and orders, from the source's $events answer (a
        notification Bundle, its content fetched when id-only). Raises _RecoveryFailedError,
        SourceUnavailableError or FhirRejected."""
        if context.recover is None:
            raise _RecoveryFailedError("no FHIR server is configured for this source")
        raw = await context.recover(subscription, gap.first, gap.last)
        try:
            payload = parse(raw, "Bundle", context.fhir_version, self.limits)
            if payload.notification is None:
                raise _RecoveryFailedError("the source's $events answer is not a notification")
            if payload.notification.id_only:
                payload, _ = await self._with_fetched(payload, context)
            extraction = extract(
                payload.resources, self.specs, self.pacs.for_source(context.source.source_system)
            )
        except ValueError as exc:
            # A value parse or extract did not foresee: still an answer that is not valid (it
            # will be the same if asked again), never a 500 for the notification that found the
            # gap. Only the error's type is named: its text may hold a value.
            raise _RecoveryFailedError(
                f"the source's $events answer could not be read ({type(exc).__name__})"
            ) from exc
        if extraction.rejections:
            raise _RecoveryFailedError(
                f"the missed events hold {len(extraction.rejections)} invalid value(s)"
            )
        return _Recovered(extraction, placements(payload.resources))

    # --- id-only notifications -----------------------------------------------------------------

    async def _with_fetched(
        self, payload: Payload, context: Context
    ) -> tuple[Payload, list[Issue]]:
        notification = payload.notification
        assert notification is not None  # noqa: S101 -- the caller checked
        named = notification.id_only[: self.max_fetched]
        if context.fetch is None:
            warning = Issue(
                "warning",
                "not-supported",
                f"the notification names {len(notification.id_only)} resource(s) without their "
                "content, and no FHIR server is configured for this source to fetch them from; "
                "nothing was sent for inference for them",
            )
            return payload, [warning]
        bodies = await context.fetch(named)
        try:
            resources = [json.loads(b) for b in bodies]
        except ValueError as exc:
            raise SourceUnavailableError("the source answered with something not JSON") from exc
        bundle = {
            "resourceType": "Bundle",
            "type": "collection",
            "entry": [
                *(_entry_json(r) for r in payload.resources),
                *({"resource": r} for r in resources),
            ],
        }
        fetched = parse(
            json.dumps(bundle).encode(), None, context.fhir_version, self.limits
        ).resources
        note = Issue(
            "information",
            "informational",
            f"fetched {len(bodies)} resource(s) named by the notification from the source",
        )
        return Payload(fetched, payload.fhir_version, payload.bundle_type, None), [note]

    # --- readings, orders, requests ------------------------------------------------------------

    def _groups(self, extraction: Extraction) -> tuple[_Group, ...]:
        found: dict[tuple[str, str], PatientReadings] = {}
        orders: dict[tuple[str, str], list[Order]] = {}
        for patient_readings in extraction.readings:
            key = (patient_readings.subject_reference, patient_readings.model)
            found[key] = patient_readings
            orders[key] = []
        for order in extraction.orders:
            orders.setdefault((order.subject_reference, order.model), []).append(order)
        return tuple(
            _Group(
                self.pseudonymize(subject),
                self.specs[model],
                found.get((subject, model)),
                (*o,),
                subject,
            )
            for (subject, model), o in orders.items()
        )

    def _merge_payload(self, payload: Prepared, pending: _Pending) -> Answer:
        requests: list[RequestInference] = []
        issues: list[Issue] = list(payload.issues)
        by_patient: dict[str, list[Issue]] = {}
        for group in payload.groups:
            sent, problems = self._merge_group(group, payload, pending)
            requests.extend(sent)
            issues.extend(problems)
            by_patient.setdefault(group.subject, []).extend(problems)
        answer = _answer(requests, issues)
        if payload.reply is None:
            return answer
        bundle = response_bundle(payload.reply, payload.issues, by_patient, requests)
        return replace(answer, status=200, bundle=bundle)

    def _merge_group(
        self, group: _Group, payload: Prepared, pending: _Pending
    ) -> tuple[list[RequestInference], list[Issue]]:
        """Merge one group into the patient's newest state (pending, else stored)."""
        spec = group.spec
        stored = self.store.get(group.pseudonym, spec.name)
        before = pending.states.get(group.key) or stored
        pending.bases.setdefault(group.key, stored)
        state = before
        requests: list[RequestInference] = []
        issues: list[Issue] = []
        steps: list[Order | None] = list(group.orders) if group.orders else [None]
        for order in steps:
            merged = merge(
                state,
                spec=spec,
                pseudonym=group.pseudonym,
                found=group.found,
                order=order,
                received_at=payload.received_at,
                lookback=self.lookback,
                producer=self.producer,
            )
            state = merged.state
            if merged.inputs is not None:
                requests.append(self._request(merged, group.pseudonym, payload))
            issues.extend(_merge_issues(spec, merged, order))
        pending.requests.extend(Outgoing(r, payload.context.trace) for r in requests)
        if state is not None and state is not before:
            pending.states[group.key] = state
        if requests or group.key in pending.states:
            pending.keys.add(group.key)
        return requests, issues

    async def _publish_all(self, pending: _Pending, publish: Publish, payloads: int) -> None:
        """Commit the requests and the new states in one transaction, then keep the states.

        One transaction, because a state on the topic says its readings were sent: it must
        never be there without its request (the follower and a restart would believe it), and
        a request without its state would be sent again by a redelivered payload.
        """
        states = list(pending.states.items())
        offsets = await publish(pending.requests, [state for _, state in states], payloads)
        for (key, state), offset in zip(states, offsets, strict=True):
            self.store.put(state, based_on=pending.bases[key])
            if offset is not None:
                self.store.written(key, offset)

    async def _publish_durably(self, pending: _Pending, publish: Publish, payloads: int) -> None:
        """Commit the requests and the states, and keep the states once committed;
        KafkaUnavailableError when that did not happen within the publish timeout.

        A timed-out publish is not withdrawn: the producer still holds the messages and
        delivers them once the broker is back. So it goes on in the background, in doubt: the
        states (with the fingerprint of what was sent) are kept if it completes, and until it
        has, these patients' new payloads are answered 503 too. The sender's retry then finds
        the readings already sent instead of making a second request (found by tests/chaos:
        Kafka stopped longer than the timeout duplicated reports).
        """
        publishing = asyncio.ensure_future(self._publish_all(pending, publish, payloads))
        try:
            await asyncio.wait_for(asyncio.shield(publishing), timeout=self.publish_timeout_s)
        except TimeoutError:
            for key in pending.keys:
                self._in_doubt[key] = publishing
                publishing.add_done_callback(functools.partial(self._resolved, key))
            raise KafkaUnavailableError("Kafka did not acknowledge in time") from None
        except Exception as exc:  # any Kafka failure means "not taken": the sender retries
            raise KafkaUnavailableError(type(exc).__name__) from exc

    def _raise_if_in_doubt(self, key: str) -> None:
        publishing = self._in_doubt.get(key)
        if publishing is not None and not publishing.done():
            raise KafkaUnavailableError(
                "an earlier message of this patient is not yet acknowledged by Kafka"
            )

    def _resolved(self, key: str, publishing: asyncio.Future[None]) -> None:
        if self._in_doubt.get(key) is publishing:
            del self._in_doubt[key]
        if not publishing.cancelled() and publishing.exception() is not None:
            # The sender was answered 503 and sends again; nothing was kept, nothing is lost.
            log.warning(
                "a publish in doubt failed",
                error=type(publishing.exception()).__name__,
            )

    def _request(self, merged: Merged, pseudonym: str, payload: Prepared) -> RequestInference:
        assert merged.inputs is not None  # noqa: S101 -- the caller checked
        state = merged.state
        return RequestInference(
            correlation_id=new_id(),
            producer=self.producer,
            model=state.model,
            patient_pseudonym=pseudonym,
            subject_reference=state.subject_reference,
            encounter_reference=state.encounter_reference,
            based_on_reference=merged.based_on_reference,
            inputs=merged.inputs,
            effective_at=merged.effective_at or payload.received_at,
            received_at=payload.received_at,
            source=_placed(payload.context.source, payload.placements, state.encounter_reference),
        )


def _placed(
    source: SourceContext, placed: Mapping[str, Placement], encounter: str | None
) -> SourceContext:
    """The source context with the ward and site the request's encounter names in the payload
    (a site configured for the source wins)."""
    placement = placed.get(encounter) if encounter is not None else None
    if placement is None:
        return source
    return source.model_copy(update={"ward": placement.ward, "site": source.site or placement.site})


@dataclass(frozen=True)
class _Recovered:
    """Missed events had again from the source: their readings and orders (and the issues met
    in them), and the ward and site each of their Encounters names."""

    extraction: Extraction
    placements: Mapping[str, Placement]


class _RecoveryFailedError(Exception):
    """Missed events could not be had from the source (the text says why; no patient data)."""


def _recovery_failure(exc: Exception) -> str:
    """Why a recovery failed, for the log and the sender: the error's own words for ours, the
    first issue's diagnostics for a refused answer (they name elements, never values)."""
    if isinstance(exc, FhirRejected):
        issues = exc.outcome.get("issue") or [{}]
        return f"the source's answer is not valid: {issues[0].get('diagnostics', 'invalid')}"
    return str(exc)


def _before(handled: _Handled | None, gap: Gap) -> _Handled | None:
    """What is handled when a gap is not: the events before it."""
    if handled is None or gap.first <= 0:
        return None
    return replace(handled, highest=min(handled.highest, gap.first - 1))


def _stripe(pseudonym: str) -> int:
    return hashlib.blake2b(pseudonym.encode(), digest_size=2).digest()[0] % _LOCK_STRIPES


def _entry_json(resource: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {"resource": resource.resource.model_dump(mode="json")}
    if resource.full_url:
        entry["fullUrl"] = resource.full_url
    return entry


def _merge_issues(spec: ModelSpec, merged: Merged, order: Order | None) -> list[Issue]:
    """What the sender should know about one patient's merge (no patient data in the text)."""
    what = f"model {spec.name}" + (f", order {order.based_on_reference}" if order else "")
    if merged.missing:
        return [
            Issue(
                "warning",
                "incomplete",
                f"{what}: required inputs missing: {', '.join(merged.missing)}; the readings "
                "received are kept, and a score is requested once all are in",
            )
        ]
    if merged.duplicate:
        already = "this order was already answered" if order else "these readings were already sent"
        return [
            Issue(
                "information",
                "duplicate",
                f"{what}: {already}; nothing new was sent for inference",
            )
        ]
    return []


def _answer(requests: Sequence[RequestInference], issues: Sequence[Issue]) -> Answer:
    unique = tuple(dict.fromkeys(issues))
    if requests:
        accepted = Issue(
            "information",
            "informational",
            "accepted: " + ", ".join(f"{r.model} request {r.correlation_id}" for r in requests),
        )
        return Answer(202, outcome((accepted, *unique)), tuple(requests), unique)
    if not unique:
        unique = (
            Issue(
                "warning",
                "not-found",
                "no resource in the payload matches the inputs of any deployed model; "
                "nothing was sent for inference",
            ),
        )
    return Answer(200, outcome(unique), (), unique)
