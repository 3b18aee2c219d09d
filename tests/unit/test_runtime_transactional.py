"""The shared transactional loop: exactly-once commits per partition, fencing, poison isolation."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest
from aiokafka import TopicPartition
from aiokafka.errors import KafkaConnectionError

from medmesh_runtime.transactional import (
    GroupCommit,
    LoopSettings,
    OutgoingRecord,
    PartitionLostError,
    PartitionTransactions,
    PoisonIsolation,
    TransactionalLoop,
)
from tests.transactional_kafka import FakeKafka, run_until

GROUP = "stage"
SOURCE = "in"
OUT = "out"
DEAD = "dead"
PREFIX = "medmesh-stage"


def _dead_letter(record: Any, reason: str) -> OutgoingRecord:
    return OutgoingRecord(DEAD, record.key, reason.encode())


def _echo_unless_poison(calls: list[int] | None = None) -> Any:
    """A batch handler that fails the whole call when any record's value is b'poison'."""

    async def handle(records: Sequence[Any]) -> list[list[OutgoingRecord]]:
        if calls is not None:
            calls.append(len(records))
        if any(r.value == b"poison" for r in records):
            raise ValueError("cannot read this record")
        return [[OutgoingRecord(OUT, r.key, r.value or b"")] for r in records]

    return handle


async def _no_sleep(seconds: float) -> None:
    return None


def _loop(kafka: FakeKafka, isolation: PoisonIsolation) -> TransactionalLoop:
    return TransactionalLoop(
        kafka.clients(GROUP),
        isolation,
        LoopSettings(
            group_id=GROUP,
            topics=(SOURCE,),
            transactional_id_prefix=PREFIX,
            poll_timeout_ms=5,
            restart_pause_s=0,
        ),
    )


async def test_a_poison_record_is_dead_lettered_and_its_neighbours_go_through() -> None:
    """A record that fails every attempt is dead-lettered; the valid records beside it are
    produced, and the partition's offset moves past all of them."""
    kafka = FakeKafka()
    for value in (b"a", b"poison", b"b"):
        kafka.append(SOURCE, value)
    isolation = PoisonIsolation(_echo_unless_poison(), _dead_letter, sleep=_no_sleep)

    await run_until(_loop(kafka, isolation), lambda: kafka.offset(GROUP, SOURCE) == 3)

    assert kafka.values(OUT) == [b"a", b"b"]
    (reason,) = kafka.values(DEAD)
    assert reason.startswith(b"failed 3 times; last error: ValueError: cannot read this record")
    assert isolation.stats.dead_lettered == 1
    assert isolation.stats.isolated_polls == 1


async def test_a_record_that_fails_twice_then_succeeds_is_produced_once() -> None:
    """Retries are bounded but real: a record failing fewer times than allowed is not lost."""
    failures = [2]

    async def flaky(records: Sequence[Any]) -> list[list[OutgoingRecord]]:
        if failures[0] > 0:
            failures[0] -= 1
            raise RuntimeError("not yet")
        return [[OutgoingRecord(OUT, r.key, r.value or b"")] for r in records]

    kafka = FakeKafka()
    kafka.append(SOURCE, b"a")
    isolation = PoisonIsolation(flaky, _dead_letter, sleep=_no_sleep)

    await run_until(_loop(kafka, isolation), lambda: kafka.offset(GROUP, SOURCE) == 1)

    assert kafka.values(OUT) == [b"a"]
    assert DEAD not in kafka.committed
    assert isolation.stats.retries == 2


async def test_a_transient_error_is_retried_from_the_committed_offset_not_dead_lettered() -> None:
    """A Kafka error in the handler is nobody's fault: the loop starts over, nothing is dead."""
    failures = [3]

    async def handle(records: Sequence[Any]) -> list[list[OutgoingRecord]]:
        if failures[0] > 0:
            failures[0] -= 1
            raise KafkaConnectionError("broker away")
        return [[OutgoingRecord(OUT, r.key, r.value or b"")] for r in records]

    kafka = FakeKafka()
    kafka.append(SOURCE, b"a")
    loop = _loop(kafka, PoisonIsolation(handle, _dead_letter, sleep=_no_sleep))

    await run_until(loop, lambda: kafka.offset(GROUP, SOURCE) == 1)

    assert kafka.values(OUT) == [b"a"]
    assert DEAD not in kafka.committed
    assert loop.restarts == 3


async def test_an_output_too_large_for_kafka_becomes_a_dead_letter_naming_the_limit() -> None:
    """An output over the producer's request limit is replaced by its record's dead letter."""

    async def bloat(records: Sequence[Any]) -> list[list[OutgoingRecord]]:
        return [[OutgoingRecord(OUT, r.key, (r.value or b"") * 1000)] for r in records]

    kafka = FakeKafka()
    kafka.append(SOURCE, b"x" * 2000)
    isolation = PoisonIsolation(bloat, _dead_letter, sleep=_no_sleep, max_output_bytes=10_000)

    await run_until(_loop(kafka, isolation), lambda: kafka.offset(GROUP, SOURCE) == 1)

    (reason,) = kafka.values(DEAD)
    assert b"2000003 bytes, over the 10000" in reason
    assert OUT not in kafka.committed


async def test_a_redelivered_poll_after_a_failed_send_is_committed_exactly_once() -> None:
    """A send failing mid-transaction aborts it; the retry from committed offsets produces each
    output once."""
    kafka = FakeKafka(fail_sends=1)
    for value in (b"a", b"b", b"c"):
        kafka.append(SOURCE, value)
    loop = _loop(kafka, PoisonIsolation(_echo_unless_poison(), _dead_letter, sleep=_no_sleep))

    await run_until(loop, lambda: kafka.offset(GROUP, SOURCE) == 3)

    assert kafka.values(OUT) == [b"a", b"b", b"c"]
    assert kafka.aborted == 1


async def test_each_input_partition_commits_with_its_own_transactional_id() -> None:
    """Two input partitions: two producers named after them, each committing its own offset."""
    kafka = FakeKafka(partitions=2)
    kafka.append(SOURCE, b"a", partition=0)
    kafka.append(SOURCE, b"b", partition=1)
    loop = _loop(kafka, PoisonIsolation(_echo_unless_poison(), _dead_letter, sleep=_no_sleep))

    await run_until(
        loop,
        lambda: kafka.offset(GROUP, SOURCE, 0) == 1 and kafka.offset(GROUP, SOURCE, 1) == 1,
    )

    assert sorted(kafka.values(OUT)) == [b"a", b"b"]
    assert sorted(kafka.transactional_ids) == [f"{PREFIX}-{SOURCE}-0", f"{PREFIX}-{SOURCE}-1"]
    assert loop.transactions == 2


async def test_a_stalled_instance_resumed_after_another_took_its_partition_cannot_commit() -> None:
    """Zombie fencing: once the partition's new owner started its producer, the old owner's
    commit fails with PartitionLostError and nothing it produced becomes visible."""
    kafka = FakeKafka()
    tp = TopicPartition(SOURCE, 0)
    stalled = PartitionTransactions(kafka.producer, GROUP, PREFIX)
    await stalled.assigned([tp])
    successor = PartitionTransactions(kafka.producer, GROUP, PREFIX)
    await successor.assigned([tp])  # the group moved the partition while the first was stopped

    with pytest.raises(PartitionLostError):
        await stalled.commit(tp, [OutgoingRecord(OUT, None, b"from the zombie")], 1)
    await successor.commit(tp, [OutgoingRecord(OUT, None, b"from the owner")], 1)

    assert kafka.values(OUT) == [b"from the owner"]
    assert kafka.offset(GROUP, SOURCE) == 1


async def test_revocation_waits_for_the_transaction_in_flight() -> None:
    """A partition is given up only after its transaction committed (no half-owned batch)."""
    kafka = FakeKafka()
    tp = TopicPartition(SOURCE, 0)
    transactions = PartitionTransactions(kafka.producer, GROUP, PREFIX)
    await transactions.assigned([tp])
    release = asyncio.Event()
    order: list[str] = []

    async def committing() -> None:
        async with transactions._lock(tp):  # holds the partition as a commit does
            await release.wait()
            order.append("committed")

    commit = asyncio.create_task(committing())
    await asyncio.sleep(0)
    revoke = asyncio.create_task(transactions.revoked([tp]))
    await asyncio.sleep(0.01)
    assert not revoke.done()
    release.set()
    await asyncio.gather(commit, revoke)
    order.append("revoked")

    assert order == ["committed", "revoked"]


async def test_a_producer_that_cannot_start_on_assignment_makes_the_loop_start_over() -> None:
    """No offsets are fetched and used for a partition whose predecessor was not fenced: the
    loop starts over until the producer starts, then processes the records once."""
    kafka = FakeKafka(fail_starts=2)
    kafka.append(SOURCE, b"a")
    loop = _loop(kafka, PoisonIsolation(_echo_unless_poison(), _dead_letter, sleep=_no_sleep))

    await run_until(loop, lambda: kafka.offset(GROUP, SOURCE) == 1)

    assert kafka.values(OUT) == [b"a"]
    assert loop.restarts >= 1


async def test_a_single_failing_poll_is_split_once_and_each_record_retried_alone() -> None:
    """Isolation costs one failed batch call plus one call per record (and the retries)."""
    calls: list[int] = []
    isolation = PoisonIsolation(_echo_unless_poison(calls), _dead_letter, sleep=_no_sleep)
    kafka = FakeKafka()
    for value in (b"a", b"b", b"poison", b"c"):
        kafka.append(SOURCE, value)

    await run_until(_loop(kafka, isolation), lambda: kafka.offset(GROUP, SOURCE) == 4)

    assert calls == [4, 1, 1, 1, 1, 1, 1]


async def test_concurrent_callers_share_one_transaction_and_each_gets_its_records_back() -> None:
    """Group commit: three callers publishing at once are committed in one transaction."""
    kafka = FakeKafka()
    group = GroupCommit(kafka.producer, "medmesh-ingest-http-1")
    await group.start()
    try:
        written = await asyncio.gather(
            *(
                group.publish([OutgoingRecord(OUT, None, v), OutgoingRecord(DEAD, None, v)])
                for v in (b"a", b"b", b"c")
            )
        )
    finally:
        await group.stop()

    assert [len(w) for w in written] == [2, 2, 2]
    assert sorted(kafka.values(OUT)) == [b"a", b"b", b"c"]
    assert group.transactions == 1


async def test_a_failed_group_fails_each_caller_and_the_next_group_commits() -> None:
    """A send failing aborts the group: its callers get the error, nothing of it is visible,
    and the next caller's records are committed on a new producer."""
    kafka = FakeKafka(fail_sends=1)
    group = GroupCommit(kafka.producer, "medmesh-ingest-http-1")
    await group.start()
    try:
        with pytest.raises(KafkaConnectionError):
            await group.publish([OutgoingRecord(OUT, None, b"lost")])
        await group.publish([OutgoingRecord(OUT, None, b"kept")])
    finally:
        await group.stop()

    assert kafka.values(OUT) == [b"kept"]
    assert kafka.aborted == 1
    assert kafka.transactional_ids == ["medmesh-ingest-http-1", "medmesh-ingest-http-1"]


async def test_a_partition_not_assigned_here_is_never_committed_nor_its_owner_fenced() -> None:
    """Records of a partition this instance does not hold (revoked, or lost to fencing) raise
    PartitionLostError: no producer is started for it, so its owner is not fenced."""
    kafka = FakeKafka()
    tp = TopicPartition(SOURCE, 0)
    owner = PartitionTransactions(kafka.producer, GROUP, PREFIX)
    await owner.assigned([tp])
    other = PartitionTransactions(kafka.producer, GROUP, PREFIX)

    with pytest.raises(PartitionLostError):
        await other.commit(tp, [OutgoingRecord(OUT, None, b"stale")], 1)
    await owner.commit(tp, [OutgoingRecord(OUT, None, b"owned")], 1)

    assert kafka.values(OUT) == [b"owned"]
    assert kafka.transactional_ids == [f"{PREFIX}-{SOURCE}-0"]


async def test_a_rebalance_callback_after_close_starts_no_producer() -> None:
    """A stopped consumer's late assignment callback starts nothing once the transactions are
    closed, and close waits for starts in flight: no stray producer fences the next loop's."""
    kafka = FakeKafka()
    tp = TopicPartition(SOURCE, 0)
    closed = PartitionTransactions(kafka.producer, GROUP, PREFIX)
    in_flight = asyncio.create_task(closed.assigned([tp]))
    await asyncio.sleep(0)
    await closed.close()
    assert in_flight.done()
    await closed.assigned([tp])  # late: after close
    successor = PartitionTransactions(kafka.producer, GROUP, PREFIX)
    await successor.assigned([tp])

    await successor.commit(tp, [OutgoingRecord(OUT, None, b"owned")], 1)

    assert kafka.values(OUT) == [b"owned"]
    assert kafka.transactional_ids == [f"{PREFIX}-{SOURCE}-0", f"{PREFIX}-{SOURCE}-0"]


async def test_records_read_before_the_committed_offset_became_final_are_not_committed() -> None:
    """The committed offset read after the producer fenced the predecessor wins: a first
    commit of records from before it (fetched earlier) raises PartitionLostError; one from the
    first record after it (past the predecessor's commit marker) commits."""
    kafka = FakeKafka()
    tp = TopicPartition(SOURCE, 0)
    consumer = kafka.consumer(GROUP)
    kafka.offsets[(GROUP, tp)] = 2  # the predecessor's last transaction moved it meanwhile
    transactions = PartitionTransactions(kafka.producer, GROUP, PREFIX)
    await transactions.assigned([tp], consumer)

    with pytest.raises(PartitionLostError, match="read before the committed offset"):
        await transactions.commit(tp, [OutgoingRecord(OUT, None, b"again")], 3, first_offset=0)
    await transactions.assigned([tp], consumer)  # the loop starts over: a new assignment
    transactions = PartitionTransactions(kafka.producer, GROUP, PREFIX)
    await transactions.assigned([tp], consumer)
    # 3, not 2: the record at the committed offset is the predecessor's commit marker.
    await transactions.commit(tp, [OutgoingRecord(OUT, None, b"new")], 4, first_offset=3)

    assert kafka.values(OUT) == [b"new"]


async def test_a_commit_arriving_while_its_partition_starts_waits_for_the_producer() -> None:
    """Records handed out before the assignment callback finished are committed once the
    partition's producer started, not refused as not held."""
    kafka = FakeKafka(start_delay_s=0.05)
    tp = TopicPartition(SOURCE, 0)
    transactions = PartitionTransactions(kafka.producer, GROUP, PREFIX)
    assigning = asyncio.create_task(transactions.assigned([tp]))
    await asyncio.sleep(0.01)  # the start is in flight

    await transactions.commit(tp, [OutgoingRecord(OUT, None, b"early")], 1, first_offset=0)
    await assigning

    assert kafka.values(OUT) == [b"early"]
