"""Ingest's inbound entrypoint: medmesh.fhir.inbound -> requests, states and rejections, exactly once.

Runs as the poll processor of ``medmesh_runtime.transactional.TransactionalLoop``: each
partition's events are prepared in turn, then applied together (``IngestService.apply``), and
what they caused (requests, patient states, the rejected events' dead letters) is committed with
the partition's offset in one transaction. So a redelivered poll (a crash, a failed commit)
produces nothing twice, and a stalled instance resumed after its partitions moved is fenced.

In turn, not concurrently: one patient's events must merge in arrival order. A source FHIR
server that fails (an id-only notification's content) commits the events before it and makes
the poll start over from there; so does Kafka not taking the transaction. Anything else that
fails on one event (a bug, an input nothing foresaw) is that event's failure: it is tried alone
up to ``max_attempts`` times, then rejected on medmesh.fhir.invalid with an OperationOutcome
naming the error kind, and the partition moves on.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from aiokafka import TopicPartition
from aiokafka.errors import KafkaError
from opentelemetry.trace import Tracer
from tenacity import AsyncRetrying

from medmesh_contracts.events import PatientReadingsUpdated
from medmesh_ingest.outcomes import Issue, outcome
from medmesh_ingest.records import Records
from medmesh_ingest.service import (
    Answer,
    IngestService,
    KafkaUnavailableError,
    Outgoing,
    Prepared,
    SourceUnavailableError,
)
from medmesh_runtime.logging import get_logger, redact_text
from medmesh_runtime.retry import retrying
from medmesh_runtime.telemetry import consumer_span
from medmesh_runtime.transactional import (
    OutgoingRecord,
    PartitionLostError,
    PartitionTransactions,
    commit_all,
)

log = get_logger("medmesh.ingest.inbound")

# Takes a payload's requests instead of their being produced to medmesh.inference.requests.
DeliverRequests = Callable[[Sequence[Outgoing]], Awaitable[None]]

# Failures that are nobody's event's fault: the poll starts over from the committed offsets.
_TRANSIENT = (SourceUnavailableError, KafkaUnavailableError, KafkaError, PartitionLostError)


class InboundIngest(Protocol):
    """What the inbound entrypoint needs of ingest (``parts.Ingest``)."""

    tracer: Tracer
    service: IngestService
    records: Records

    async def prepare_inbound(self, record: Any) -> Prepared | Answer: ...


@dataclass(frozen=True)
class _Ready:
    prepared: Prepared
    record: Any


@dataclass(frozen=True)
class _Rejected:
    dead_letter: OutgoingRecord
    offset: int


def _between(rejected: Sequence[_Rejected], start: int, end: int) -> list[OutgoingRecord]:
    return [r.dead_letter for r in rejected if start <= r.offset < end]


def _failed_answer(error: BaseException, attempts: int) -> Answer:
    """The rejection of an event whose handling kept failing (the error kind; its text only
    with patient data redacted)."""
    text = redact_text(f"{type(error).__name__}: {error}")[:500]
    issue = Issue(
        "error", "exception", f"processing this event failed {attempts} times; last error: {text}"
    )
    return Answer(422, outcome((issue,)))


class InboundPoll:
    """The poll processor of ingest's inbound topic (see the module's docstring)."""

    def __init__(
        self,
        ingest: InboundIngest,
        group_id: str,
        *,
        max_attempts: int = 3,
        backoff_s: float = 0.2,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        deliver_requests: DeliverRequests | None = None,
    ) -> None:
        self._ingest = ingest
        self._group_id = group_id
        self._max_attempts = max_attempts
        self._backoff_s = backoff_s
        self._sleep = sleep
        self.failed_events = 0
        # The monolith topology hands requests to its in-process router instead of producing
        # them (they are delivered before the transaction of the states and offsets commits).
        self.deliver_requests = deliver_requests

    async def __call__(
        self, batch: Mapping[TopicPartition, Sequence[Any]], transactions: PartitionTransactions
    ) -> None:
        """Commit each partition's events (the partitions concurrently)."""
        await commit_all(
            self._partition(tp, records, transactions) for tp, records in batch.items()
        )

    async def _partition(
        self, tp: TopicPartition, records: Sequence[Any], transactions: PartitionTransactions
    ) -> None:
        ready: list[_Ready] = []
        rejected: list[_Rejected] = []
        end = records[-1].offset + 1
        unavailable: SourceUnavailableError | None = None
        for record in records:
            with consumer_span(self._ingest.tracer, record, self._group_id):
                try:
                    prepared = await self._prepared(record)
                except SourceUnavailableError as exc:
                    unavailable, end = exc, record.offset
                    break
                if isinstance(prepared, Prepared):
                    ready.append(_Ready(prepared, record))
                elif prepared.rejected:
                    rejection = self._ingest.records.rejection(record, prepared)
                    rejected.append(_Rejected(rejection, record.offset))
        if end > records[0].offset:
            await self._apply(tp, ready, rejected, records[0].offset, end, transactions)
        log.info(
            "inbound poll processed",
            partition=tp.partition,
            events=len(records),
            applied=len(ready),
            rejected=len(rejected),
            first_offset=records[0].offset,
        )
        if unavailable is not None:
            raise unavailable

    async def _prepared(self, record: Any) -> Prepared | Answer:
        """The event prepared; retried when it fails unforeseen, then rejected."""
        try:
            async for attempt in self._retrying():
                with attempt:
                    return await self._ingest.prepare_inbound(record)
        except _TRANSIENT:
            raise
        except Exception as exc:  # noqa: BLE001 -- this event's failure: rejected
            return self._failed(record, exc)
        raise AssertionError("unreachable: tenacity returns or raises")  # pragma: no cover

    def _retrying(self) -> AsyncRetrying:
        return retrying(
            self._max_attempts, self._backoff_s, transient=_TRANSIENT, sleep=self._sleep
        )

    def _failed(self, record: Any, error: BaseException) -> Answer:
        self.failed_events += 1
        log.warning(
            "inbound event failed every attempt: rejected",
            partition=record.partition,
            offset=record.offset,
            error=type(error).__name__,
        )
        return _failed_answer(error, self._max_attempts)

    async def _apply(
        self,
        tp: TopicPartition,
        ready: Sequence[_Ready],
        rejected: Sequence[_Rejected],
        start: int,
        end: int,
        transactions: PartitionTransactions,
    ) -> None:
        try:
            await self._apply_once(tp, ready, rejected, start, end, transactions)
        except _TRANSIENT:
            raise
        except Exception as exc:  # noqa: BLE001 -- an event's failure: found by applying alone
            log.warning(
                "an inbound poll failed to merge: applying its events one at a time",
                partition=tp.partition,
                events=len(ready),
                error=type(exc).__name__,
            )
            await self._apply_alone(tp, ready, rejected, start, end, transactions)

    async def _apply_once(
        self,
        tp: TopicPartition,
        ready: Sequence[_Ready],
        rejected: Sequence[_Rejected],
        start: int,
        end: int,
        transactions: PartitionTransactions,
    ) -> None:
        """Apply ``ready`` and commit what it caused, the rejections in [start, end) and the
        offset ``end``; when applying stops early (a patient in doubt), only up to there."""
        committed = False

        async def publish(
            requests: Sequence[Outgoing], states: Sequence[PatientReadingsUpdated], payloads: int
        ) -> list[int | None]:
            nonlocal committed
            upto = end if payloads >= len(ready) else ready[payloads].record.offset
            if self.deliver_requests is not None:
                await self.deliver_requests(requests)
                requests = ()
            outputs = [
                *self._ingest.records.requests(requests),
                *self._ingest.records.states(states),
                *_between(rejected, start, upto),
            ]
            written = await transactions.commit(tp, outputs, upto, first_offset=start)
            committed = True
            return [getattr(w, "offset", None) for w in written[len(requests) :][: len(states)]]

        if ready:
            await self._ingest.service.apply([r.prepared for r in ready], publish)
        if not committed:
            await transactions.commit(tp, _between(rejected, start, end), end, first_offset=start)

    async def _apply_alone(
        self,
        tp: TopicPartition,
        ready: Sequence[_Ready],
        rejected: Sequence[_Rejected],
        start: int,
        end: int,
        transactions: PartitionTransactions,
    ) -> None:
        """Apply each event in its own transaction; one that keeps failing is rejected."""
        for item in ready:
            upto = item.record.offset + 1
            try:
                async for attempt in self._retrying():
                    with attempt:
                        await self._apply_once(tp, [item], rejected, start, upto, transactions)
            except _TRANSIENT:
                raise
            except Exception as exc:  # noqa: BLE001 -- every attempt failed: rejected
                failure = self._ingest.records.rejection(
                    item.record, self._failed(item.record, exc)
                )
                await transactions.commit(
                    tp, [*_between(rejected, start, upto), failure], upto, first_offset=start
                )
            start = upto
        if start < end:
            await transactions.commit(tp, _between(rejected, start, end), end, first_offset=start)
