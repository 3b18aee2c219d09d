"""Per-hop cost of Kafka on this machine, side by side in one run:

- raw: an aiokafka consumer that re-publishes each record to the next topic (the floor);
- faststream: the same hop as a faststream subscriber + publisher with the telemetry middleware,
  i.e. what every medmesh service does per message.

Latency is measured at low load (one message in flight: the per-hop figure the seeds argue
about) and throughput with many in flight.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import Awaitable, Callable

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from opentelemetry.sdk.trace import TracerProvider

from medmesh_cli.bench.stats import Summary, summarize
from medmesh_cli.devstack.topics import create_topics
from medmesh_contracts.topics import TopicSpec
from medmesh_router.followers import Record, record_of
from medmesh_runtime.kafka import build_broker
from medmesh_runtime.settings import ServiceSettings

PAYLOAD = b'{"bench": "x"}' + b" " * 1500  # about the size of a RunInference message
Relay = Callable[[str, str, str], Awaitable[Callable[[], Awaitable[None]]]]


async def _raw_relay(bootstrap: str, source: str, sink: str) -> Callable[[], Awaitable[None]]:
    consumer = AIOKafkaConsumer(
        source,
        bootstrap_servers=bootstrap,
        group_id=f"bench-raw-{uuid.uuid4().hex[:6]}",
        auto_offset_reset="earliest",
        enable_auto_commit=True,
    )
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True)
    await consumer.start()
    await producer.start()

    async def loop() -> None:
        async for record in consumer:
            await producer.send_and_wait(
                sink, record.value, key=record.key, headers=list(record.headers)
            )

    task = asyncio.create_task(loop())

    async def stop() -> None:
        task.cancel()
        await consumer.stop()
        await producer.stop()

    return stop


async def _faststream_relay(
    bootstrap: str, source: str, sink: str
) -> Callable[[], Awaitable[None]]:
    # Built exactly as every medmesh service builds its broker (durability, tracing, metrics).
    broker = build_broker(
        ServiceSettings(kafka_bootstrap_servers=bootstrap, instance_id="bench"),
        "bench",
        TracerProvider(),
    )
    out = broker.publisher(sink)

    # The record as the handler's body (the router followers' decoder): a ``KafkaMessage``
    # parameter would cost a thread-pool round trip per message (issue 17).
    @broker.subscriber(
        source,
        group_id=f"bench-fs-{uuid.uuid4().hex[:6]}",
        auto_offset_reset="earliest",
        decoder=record_of,
    )
    async def relay(record: Record) -> None:
        await out.publish(record.value, key=record.key)

    await broker.start()
    return broker.stop


async def _measure(
    bootstrap: str, relay: Relay, label: str, messages: int, in_flight: int
) -> tuple[Summary, Summary]:
    run = uuid.uuid4().hex[:8]
    source, sink = f"bench.{label}.{run}.in", f"bench.{label}.{run}.out"
    await create_topics(bootstrap, [TopicSpec(source, 1), TopicSpec(sink, 1)])
    stop = await relay(bootstrap, source, sink)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True)
    sink_consumer = AIOKafkaConsumer(
        sink,
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        group_id=f"bench-sink-{run}",
    )
    await producer.start()
    await sink_consumer.start()
    sent: dict[bytes, float] = {}
    latencies: list[float] = []

    async def drain(expected: int) -> None:
        while len(latencies) < expected:
            batch = await sink_consumer.getmany(timeout_ms=1000)
            now = time.perf_counter()
            for records in batch.values():
                for record in records:
                    if record.key in sent:
                        latencies.append((now - sent.pop(record.key)) * 1000)

    try:
        # warm-up: joins, metadata and JIT out of the measurement
        for i in range(20):
            key = f"warm-{i}".encode()
            sent[key] = time.perf_counter()
            await producer.send_and_wait(source, PAYLOAD, key=key)
            await drain(i + 1)
        latencies.clear()
        # low load: one message in flight
        started = time.perf_counter()
        for i in range(messages // 4):
            key = f"one-{i}".encode()
            sent[key] = time.perf_counter()
            await producer.send_and_wait(source, PAYLOAD, key=key)
            await drain(i + 1)
        one = summarize(f"{label} hop, 1 in flight", latencies, time.perf_counter() - started)
        latencies.clear()
        # throughput: many in flight
        started = time.perf_counter()
        for i in range(messages):
            key = f"many-{i}".encode()
            sent[key] = time.perf_counter()
            await producer.send(source, PAYLOAD, key=key)
            if i % in_flight == in_flight - 1:
                await drain(i + 1 - in_flight // 2)
        await drain(messages)
        many = summarize(
            f"{label} hop, {in_flight} in flight", latencies, time.perf_counter() - started
        )
    finally:
        await sink_consumer.stop()
        await producer.stop()
        await stop()
    return one, many


async def run_hops(bootstrap: str, messages: int = 2000, in_flight: int = 200) -> list[Summary]:
    """Raw and faststream hops, measured one after the other on the same broker."""
    results: list[Summary] = []
    for label, relay in (("raw", _raw_relay), ("faststream", _faststream_relay)):
        one, many = await _measure(bootstrap, relay, label, messages, in_flight)
        results += [one, many]
    return results


def cpu_count() -> int:
    """Cores this benchmark shares with the broker (reported beside the figures)."""
    return os.cpu_count() or 1
