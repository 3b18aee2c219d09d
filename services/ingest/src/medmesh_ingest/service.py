"""What ingest does with one FHIR payload, whatever transport brought it.

``IngestService.handle`` parses and checks the payload, fetches the content of id-only
Subscription notifications, extracts readings and orders, merges them into each patient's state
(``readings.merge``) and publishes the requests and the new states. Its I/O is injected at one
bootstrap point (``app.create_app``): the two publish functions and the fetcher. The HTTP
endpoint and the inbound-topic subscriber differ only in how they deliver the ``Answer``.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from medmesh_contracts.events import (
    PatientReadingsUpdated,
    Producer,
    RequestInference,
    SourceContext,
    new_id,
)
from medmesh_contracts.modelspec import ModelSpec
from medmesh_ingest.extraction import Extraction, Order, PatientReadings, extract
from medmesh_ingest.outcomes import INVALID_FHIR, FhirRejected, Issue, outcome
from medmesh_ingest.readings import Merged, ReadingsStore, merge, state_key
from medmesh_ingest.validation import FhirVersion, Limits, Payload, parse
from medmesh_runtime.logging import get_logger

PublishRequest = Callable[[RequestInference], Awaitable[None]]
PublishState = Callable[[PatientReadingsUpdated], Awaitable[None]]
# Fetches resources named by an id-only notification: (references, version) -> raw JSON each.
Fetch = Callable[[Sequence[str]], Awaitable[list[bytes]]]

# Notification types that carry no clinical content: acknowledged, nothing else.
_ACKNOWLEDGED_ONLY = frozenset({"handshake", "heartbeat", "query-status"})
_LOCK_STRIPES = 256
log = get_logger("medmesh.ingest.service")


class SourceUnavailableError(Exception):
    """The source FHIR server could not give the resources a notification named."""


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


@dataclass(frozen=True)
class Answer:
    """What to tell the sender: an HTTP status and an OperationOutcome, and what was sent."""

    status: int
    operation_outcome: dict[str, Any]
    requests: tuple[RequestInference, ...] = ()
    issues: tuple[Issue, ...] = field(default=())

    @property
    def rejected(self) -> bool:
        """True when the payload was not acceptable FHIR (a 4xx answer)."""
        return 400 <= self.status < 500


class IngestService:
    """The application service: one payload in, requests and state updates out."""

    def __init__(
        self,
        *,
        specs: Mapping[str, ModelSpec],
        pseudonymize: Callable[[str], str],
        producer: Producer,
        store: ReadingsStore,
        publish_request: PublishRequest,
        publish_state: PublishState,
        limits: Limits,
        lookback: timedelta,
        max_fetched: int = 100,
        publish_timeout_s: float = 10.0,
    ) -> None:
        self.specs = specs
        self.pseudonymize = pseudonymize
        self.producer = producer
        self.store = store
        self.publish_request = publish_request
        self.publish_state = publish_state
        self.limits = limits
        self.lookback = lookback
        self.max_fetched = max_fetched
        self.publish_timeout_s = publish_timeout_s
        self._locks = [asyncio.Lock() for _ in range(_LOCK_STRIPES)]
        # Publishes that outlived their timeout (the sender was answered 503) but may still be
        # acknowledged when Kafka is back, per state key; see ``_publish_durably``.
        self._in_doubt: dict[str, asyncio.Task[None]] = {}

    async def handle(self, raw: bytes, context: Context, received_at: datetime) -> Answer:
        """Everything ingest does with one payload; raises KafkaUnavailableError or
        SourceUnavailableError when the payload could not be taken (the sender retries)."""
        try:
            payload = parse(raw, context.resource_type_hint, context.fhir_version, self.limits)
        except FhirRejected as rejected:
            return Answer(rejected.status, rejected.outcome)
        notes: list[Issue] = []
        notification = payload.notification
        if notification is not None:
            if notification.type in _ACKNOWLEDGED_ONLY:
                note = Issue(
                    "information",
                    "informational",
                    f"Subscription {notification.type} acknowledged; nothing to score.",
                )
                return Answer(200, outcome((note,)), issues=(note,))
            if notification.id_only:
                try:
                    payload, fetched_notes = await self._with_fetched(payload, context)
                except FhirRejected as rejected:
                    return Answer(rejected.status, rejected.outcome)
                notes.extend(fetched_notes)
        extraction = extract(payload.resources, self.specs, received_at=received_at)
        if extraction.rejections:
            return Answer(INVALID_FHIR, outcome(extraction.rejections))
        return await self._apply(extraction, context, received_at, notes)

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

    async def _apply(
        self,
        extraction: Extraction,
        context: Context,
        received_at: datetime,
        notes: list[Issue],
    ) -> Answer:
        groups: dict[tuple[str, str], tuple[PatientReadings | None, list[Order]]] = {}
        for patient_readings in extraction.readings:
            key = (patient_readings.subject_reference, patient_readings.model)
            groups[key] = (patient_readings, [])
        for order in extraction.orders:
            found_here, orders = groups.get((order.subject_reference, order.model), (None, []))
            groups[(order.subject_reference, order.model)] = (found_here, [*orders, order])
        requests: list[RequestInference] = []
        issues: list[Issue] = [*notes, *extraction.issues]
        for (subject, model), (found, orders) in groups.items():
            pseudonym = self.pseudonymize(subject)
            async with self._locks[_stripe(pseudonym)]:
                self._raise_if_in_doubt(state_key(pseudonym, model))
                sent, problems = await self._merge_and_publish(
                    pseudonym, self.specs[model], found, orders, context, received_at
                )
            requests.extend(sent)
            issues.extend(problems)
        return _answer(requests, issues)

    async def _merge_and_publish(
        self,
        pseudonym: str,
        spec: ModelSpec,
        found: PatientReadings | None,
        orders: Sequence[Order],
        context: Context,
        received_at: datetime,
    ) -> tuple[list[RequestInference], list[Issue]]:
        """Under the patient's lock: merge, publish requests, then the state (then keep it)."""
        state = self.store.get(pseudonym, spec.name)
        requests: list[RequestInference] = []
        issues: list[Issue] = []
        steps: list[Order | None] = list(orders) if orders else [None]
        merged: Merged | None = None
        for order in steps:
            merged = merge(
                state,
                spec=spec,
                pseudonym=pseudonym,
                found=found,
                order=order,
                received_at=received_at,
                lookback=self.lookback,
                producer=self.producer,
            )
            state = merged.state
            if merged.inputs is not None:
                requests.append(self._request(merged, pseudonym, context, received_at))
            issues.extend(_merge_issues(spec, merged, order))
        assert merged is not None  # noqa: S101 -- steps is never empty
        changed = (
            state
            if state is not None and state is not self.store.get(pseudonym, spec.name)
            else None
        )
        if requests or changed is not None:
            await self._publish_durably(state_key(pseudonym, spec.name), requests, changed)
        return requests, issues

    async def _publish_all(
        self, requests: Sequence[RequestInference], state: PatientReadingsUpdated | None
    ) -> None:
        for request in requests:
            await self.publish_request(request)
        if state is not None:
            await self.publish_state(state)
            self.store.put(state)

    async def _publish_durably(
        self,
        key: str,
        requests: Sequence[RequestInference],
        state: PatientReadingsUpdated | None,
    ) -> None:
        """Publish the requests, then the state, and keep the state once both are acknowledged;
        KafkaUnavailableError when that did not happen within the publish timeout.

        A timed-out publish is not withdrawn: the producer still holds the messages and
        delivers them once the broker is back. So it goes on in the background, in doubt: the
        state (with the fingerprint of what was sent) is kept if it completes, and until it
        has, this patient's new payloads are answered 503 too. The sender's retry then finds
        the readings already sent instead of making a second request (found by tests/chaos:
        Kafka stopped longer than the timeout duplicated reports).
        """
        publishing = asyncio.ensure_future(self._publish_all(requests, state))
        try:
            await asyncio.wait_for(asyncio.shield(publishing), timeout=self.publish_timeout_s)
        except TimeoutError:
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

    def _resolved(self, key: str, publishing: asyncio.Task[None]) -> None:
        if self._in_doubt.get(key) is publishing:
            del self._in_doubt[key]
        if not publishing.cancelled() and publishing.exception() is not None:
            # The sender was answered 503 and sends again; nothing was kept, nothing is lost.
            log.warning(
                "a publish in doubt failed",
                error=type(publishing.exception()).__name__,
            )

    def _request(
        self, merged: Merged, pseudonym: str, context: Context, received_at: datetime
    ) -> RequestInference:
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
            effective_at=merged.effective_at or received_at,
            received_at=received_at,
            source=context.source,
        )


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
