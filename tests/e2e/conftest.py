"""End-to-end fixtures: the real Kafka broker, the real Triton server, the real PACS (Orthanc
with DICOMweb, seeded with the demo studies), the real FHIR server (HAPI's JPA server) and the
four services, started once per test session
exactly as `medmesh up` starts them (on separate ports).

If Kafka, Triton, Orthanc or the FHIR server cannot start (or Orthanc is not installed), every end-to-end test
errors with the reason: never a skip.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from medmesh_cli.devstack.paths import run_dir
from medmesh_cli.devstack.stack import Stack, StackConfig, StackPorts
from medmesh_contracts import topics


def e2e_ports(base: int) -> StackPorts:
    """The end-to-end stack's ports, all derived from one base (MEDMESH_E2E_PORT_BASE)."""
    return StackPorts.from_base(base)


# Separate from `medmesh up`'s ports, and movable so that two checkouts can test side by side.
E2E_PORT_BASE = int(os.environ.get("MEDMESH_E2E_PORT_BASE", "19000"))
E2E_PORTS = e2e_ports(E2E_PORT_BASE)
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "fhir"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test in this folder as e2e (select them with -m e2e, skip none)."""
    for item in items:
        if "tests/e2e/" in str(item.path):
            item.add_marker(pytest.mark.e2e)
    # The fuzzing floods medmesh.fhir.invalid and the span file: it runs after everything else,
    # and the audit of every report the session produced runs last of all.
    last = {"test_ingest_fuzz.py": 1, "test_zz_session_reports.py": 2}
    items.sort(key=lambda item: last.get(item.path.name, 0))


@pytest.fixture(scope="session")
def stack() -> Iterator[Stack]:
    """The whole local stack, started once for the session and stopped at its end."""
    config = StackConfig(
        ports=E2E_PORTS,
        state_dir=run_dir(f"e2e-{E2E_PORT_BASE}"),
        kafka_heap="512m",
        partitions=2,
        # The FHIR server runs, but the stack's reporting does not deliver to it: the other
        # tests' patients are not on it, and the delivery tests run their own delivery loops.
        deliver_reports=False,
    )
    running = Stack(config)
    try:
        running.start(timeout_s=240)
    except Exception as exc:  # noqa: BLE001 -- re-raised as a failure that names the broken part
        pytest.fail(
            f"the end-to-end stack did not start (Kafka, Triton, Orthanc, the FHIR server or a "
            f"service): {exc}",
            pytrace=False,
        )
    yield running
    running.stop()


@dataclass
class Record:
    """One consumed record, decoded for assertions."""

    topic: str
    key: bytes | None
    value: bytes
    headers: dict[str, str]
    offset: int

    def json(self) -> Any:
        """The value parsed as JSON."""
        return json.loads(self.value)


@dataclass
class TopicTap:
    """Reads every partition of some topics from the beginning, for the whole session."""

    bootstrap: str
    topic_names: tuple[str, ...]
    records: dict[str, list[Record]] = field(default_factory=dict)
    _consumer: AIOKafkaConsumer | None = None
    _task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Assign all partitions, seek to the beginning, and collect in the background."""
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap,
            enable_auto_commit=False,
            isolation_level="read_committed",
        )
        await consumer.start()
        partitions = [
            TopicPartition(topic, p)
            for topic in self.topic_names
            for p in sorted(
                consumer.partitions_for_topic(topic) or await _partitions(consumer, topic)
            )
        ]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        self._consumer = consumer
        self._task = asyncio.create_task(self._collect())

    async def _collect(self) -> None:
        assert self._consumer is not None
        async for message in self._consumer:
            record = Record(
                topic=message.topic,
                key=message.key,
                value=message.value or b"",
                headers={k: bytes(v).decode() for k, v in message.headers},
                offset=message.offset,
            )
            self.records.setdefault(message.topic, []).append(record)

    def matching(self, topic: str, predicate: Callable[[Record], bool]) -> list[Record]:
        """Records seen so far on ``topic`` that satisfy ``predicate``."""
        return [r for r in self.records.get(topic, []) if predicate(r)]

    async def wait_for(
        self, topic: str, predicate: Callable[[Record], bool], timeout_s: float = 60.0
    ) -> Record:
        """The first record on ``topic`` satisfying ``predicate``; fails after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = self.matching(topic, predicate)
            if found:
                return found[0]
            await asyncio.sleep(0.05)
        pytest.fail(f"no matching record on {topic} within {timeout_s:.0f}s")

    async def stop(self) -> None:
        """Stop collecting."""
        if self._task is not None:
            self._task.cancel()
        if self._consumer is not None:
            await self._consumer.stop()


async def _partitions(consumer: AIOKafkaConsumer, topic: str) -> set[int]:
    for _ in range(50):
        await consumer._client.force_metadata_update()  # aiokafka has no public metadata refresh
        found = consumer.partitions_for_topic(topic)
        if found:
            return set(found)
        await asyncio.sleep(0.1)
    raise RuntimeError(f"topic {topic} has no partitions")


@pytest.fixture(scope="session")
async def tap(stack: Stack) -> AsyncIterator[TopicTap]:
    """A session-long reader of the topics the end-to-end tests assert on."""
    reader = TopicTap(
        stack.config.bootstrap,
        (topics.REPORTS_DIAGNOSTIC, topics.FHIR_INVALID, topics.INFERENCE_REQUESTS),
    )
    await reader.start()
    yield reader
    await reader.stop()


@pytest.fixture(scope="session")
async def producer(stack: Stack) -> AsyncIterator[AIOKafkaProducer]:
    """A producer standing in for a hospital system that publishes to medmesh.fhir.inbound."""
    kafka = AIOKafkaProducer(bootstrap_servers=stack.config.bootstrap, acks="all")
    await kafka.start()
    yield kafka
    await kafka.stop()


def fixture_with_new_patient(name: str) -> tuple[bytes, str]:
    """A fixture file whose patient is replaced by a fresh one; returns (payload, patient id).

    Each test sends its own patient so that it can find its report among everyone else's.
    """
    data = json.loads((FIXTURES / name).read_text())
    new_id = f"e2e-{uuid.uuid4().hex[:12]}"
    return json.dumps(_renamed(data, new_id)).encode(), new_id


def _renamed(node: Any, new_id: str) -> Any:
    if isinstance(node, dict):
        renamed = {k: _renamed(v, new_id) for k, v in node.items()}
        if renamed.get("resourceType") == "Patient" and "id" in renamed:
            renamed["id"] = new_id
        if isinstance(renamed.get("reference"), str) and renamed["reference"].startswith(
            "Patient/"
        ):
            renamed["reference"] = f"Patient/{new_id}"
        return renamed
    if isinstance(node, list):
        return [_renamed(v, new_id) for v in node]
    return node
