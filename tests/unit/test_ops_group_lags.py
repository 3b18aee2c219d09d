"""`medmesh status`'s consumer lag read (kafka_io.group_lags) and how its consumers are stopped."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, ClassVar

import pytest
from aiokafka import TopicPartition
from aiokafka.structs import OffsetAndMetadata

from medmesh_cli.ops import kafka_io
from medmesh_cli.ops.connection import CliSettings, Connection

Committed = dict[str, dict[TopicPartition, OffsetAndMetadata]]


class GroupLessConsumer:
    """What aiokafka's consumer without a group does around start and stop: start() creates a
    task of its own (NoGroupCoordinator's committed-offset reset), stop() cancels and awaits it.
    A task cancelled before it first ran raises CancelledError out of that await."""

    ends: ClassVar[dict[TopicPartition, int]] = {}

    def __init__(self, **_kwargs: Any) -> None:
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._reset_committed())

    async def _reset_committed(self) -> None:
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.Event().wait()

    async def end_offsets(self, parts: list[TopicPartition]) -> dict[TopicPartition, int]:
        await asyncio.sleep(0)  # a request to the broker: the task runs meanwhile
        return {p: self.ends[p] for p in parts}

    async def stop(self) -> None:
        assert self._task is not None
        self._task.cancel()
        await self._task


class Admin:
    """An admin client that lists the given groups and their committed offsets."""

    committed: ClassVar[Committed] = {}

    def __init__(self, **_kwargs: Any) -> None:
        pass

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def list_consumer_groups(self) -> list[tuple[str, str]]:
        return [(group, "consumer") for group in self.committed]

    async def list_consumer_group_offsets(
        self, group: str
    ) -> dict[TopicPartition, OffsetAndMetadata]:
        return self.committed[group]


@pytest.fixture
def connection(monkeypatch: pytest.MonkeyPatch) -> Connection:
    """A PLAINTEXT connection whose clients are the fakes above."""
    monkeypatch.setattr(kafka_io, "AIOKafkaConsumer", GroupLessConsumer)
    monkeypatch.setattr(kafka_io, "AIOKafkaAdminClient", Admin)
    return Connection(CliSettings(kafka_bootstrap_servers="kafka:9092"))


def test_lags_of_groups_that_committed_nothing_yet(
    connection: Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fresh stack (groups, no committed offset): every group listed with no topic, and no
    CancelledError from stopping the consumer that made no request (seen live: status crashed)."""
    monkeypatch.setattr(Admin, "committed", {"medmesh-router": {}, "medmesh-reporting": {}})
    lags = asyncio.run(kafka_io.group_lags(connection))
    assert lags == {"medmesh-reporting": {}, "medmesh-router": {}}


def test_lags_sum_per_group_and_topic(
    connection: Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lag is end minus committed offset, summed over a topic's partitions; other prefixes and
    groups that committed nothing are told apart."""
    a0, a1 = (
        TopicPartition("medmesh.inference.requests", 0),
        TopicPartition("medmesh.inference.requests", 1),
    )
    committed = {
        "medmesh-router": {a0: OffsetAndMetadata(5, ""), a1: OffsetAndMetadata(7, "")},
        "medmesh-reporting": {},
        "someone-else": {a0: OffsetAndMetadata(0, "")},
    }
    monkeypatch.setattr(Admin, "committed", committed)
    monkeypatch.setattr(GroupLessConsumer, "ends", {a0: 9, a1: 7})
    lags = asyncio.run(kafka_io.group_lags(connection))
    assert lags == {"medmesh-reporting": {}, "medmesh-router": {"medmesh.inference.requests": 4}}


def test_a_real_cancellation_while_stopping_is_passed_on() -> None:
    """stop_consumer swallows only the consumer's own task's cancellation: a caller cancelled
    while it stops the consumer is still cancelled."""

    class SlowStop(GroupLessConsumer):
        async def stop(self) -> None:
            await asyncio.Event().wait()

    async def cancelled_while_stopping() -> None:
        stopping = asyncio.create_task(kafka_io.stop_consumer(SlowStop()))
        await asyncio.sleep(0)
        stopping.cancel()
        await stopping

    with pytest.raises(asyncio.CancelledError):
        asyncio.run(cancelled_while_stopping())
