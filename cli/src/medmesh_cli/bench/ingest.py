"""Issue 3: ingest alone, against a plain parse-and-produce loop on the same broker.

- plain loop: its own process (``python -m medmesh_cli.bench.ingest``): an aiokafka consumer that
  parses each event with fhir.resources (R4B Bundle) and produces it with aiokafka (acks=all),
  awaiting the acknowledgements of each poll together (as ingest does with its poll's events);
- ingest: the same burst of vitals Bundles published to medmesh.fhir.inbound, timed until each
  event's RequestInference is on medmesh.inference.requests.

Both report events/s, p50/p99 (from each event's send in the burst) and CPU per event (the
process's user + system time over the series). The router is stopped meanwhile (ingest alone);
its group is moved past the burst before it starts again. Target: ingest >= 70% of the loop.
"""

from __future__ import annotations

import asyncio
import json
import math
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from fhir.resources.R4B.bundle import Bundle

from medmesh_cli.bench.common import (
    Message,
    Ratio,
    Sink,
    burst_summary,
    process_cpu_s,
    publish_burst,
    ratio,
    ratios_markdown,
    run_id,
)
from medmesh_cli.bench.pipeline import vitals_events
from medmesh_cli.bench.stats import Summary, markdown_table
from medmesh_cli.devstack.paths import repo_root
from medmesh_cli.devstack.stack import Stack
from medmesh_cli.devstack.topics import create_topics
from medmesh_contracts import topics
from medmesh_contracts.events import (
    PatientReadingsUpdated,
    Producer,
    SourceContext,
    to_wire,
    utc_now,
)
from medmesh_contracts.modelspec import load_specs
from medmesh_contracts.topics import TopicSpec
from medmesh_ingest.pseudonym import Pseudonymizer
from medmesh_ingest.readings import ReadingsStore
from medmesh_ingest.service import Context, IngestService, Outgoing
from medmesh_ingest.validation import Limits

ROUTER = "router"
ROUTER_GROUP = "medmesh-router"


def bench_events(template: dict[str, Any], count: int, run: str) -> list[Message]:
    """(id, value, key, headers) of ``count`` Bundles, one patient each; the id is the subject."""
    messages: list[Message] = []
    for i, event in enumerate(vitals_events(template, count, count)):
        patient = f"bi-{run}-{i}"
        value = event.replace(f'"bench-{i}"'.encode(), f'"{patient}"'.encode()).replace(
            f'"Patient/bench-{i}"'.encode(), f'"Patient/{patient}"'.encode()
        )
        subject = f"Patient/{patient}"
        messages.append((subject, value, patient.encode(), []))
    return messages


def subject_of(record: Any) -> str | None:
    """The subject reference of a RequestInference record (None for anything else)."""
    try:
        value = json.loads(record.value)
    except (TypeError, ValueError):
        return None
    subject = value.get("subject_reference") if isinstance(value, dict) else None
    return subject if isinstance(subject, str) else None


async def plain_loop(bootstrap: str, source: str, sink: str) -> None:
    """Parse each event with fhir.resources (R4B) and produce it to ``sink``; until SIGTERM."""
    consumer = AIOKafkaConsumer(
        source,
        bootstrap_servers=bootstrap,
        group_id=f"bench-plain-{run_id()}",
        auto_offset_reset="earliest",
    )
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True)
    await consumer.start()
    await producer.start()
    stopping = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopping.set)
    print("ready", flush=True)

    async def loop() -> None:
        # Per poll: parse each event, send each result, then await every acknowledgement
        # together (as ingest does), so that both sides are bound by CPU, not by round trips.
        while True:
            polled = await consumer.getmany(timeout_ms=100, max_records=500)
            acknowledgements = []
            for records in polled.values():
                for record in records:
                    bundle = Bundle.model_validate_json(record.value or b"")
                    patient = next(
                        e.resource.id
                        for e in bundle.entry or []
                        if e.resource is not None and e.resource.get_resource_type() == "Patient"
                    )
                    out = json.dumps({"subject_reference": f"Patient/{patient}"}).encode()
                    acknowledgements.append(await producer.send(sink, out, key=record.key))
            await asyncio.gather(*acknowledgements)

    task = asyncio.create_task(loop())
    await stopping.wait()
    task.cancel()
    await consumer.stop()
    await producer.stop()


async def _burst(
    bootstrap: str,
    source: str,
    sink_topic: str,
    messages: list[Message],
    label: str,
    pid: int | None,
) -> tuple[Summary, int, float]:
    sink = Sink(bootstrap, [sink_topic], subject_of)
    await sink.start()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True)
    await producer.start()
    cpu_before = process_cpu_s(pid)
    try:
        sent = await publish_burst(producer, source, messages)
        missing = await sink.wait_for(sent, timeout_s=60 + len(messages) / 10)
    finally:
        cpu = process_cpu_s(pid) - cpu_before
        await producer.stop()
        await sink.stop()
    done = len(messages) - missing
    return burst_summary(label, sent, sink.arrived), missing, cpu / done if done else math.nan


async def _skip_router_backlog(bootstrap: str) -> None:
    """Move the (stopped) router's group to the end of the requests topic."""
    consumer = AIOKafkaConsumer(
        topics.INFERENCE_REQUESTS,
        bootstrap_servers=bootstrap,
        group_id=ROUTER_GROUP,
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        while not consumer.assignment():
            await consumer.getmany(timeout_ms=200)
        await consumer.seek_to_end()
        offsets = {tp: await consumer.position(tp) for tp in consumer.assignment()}
        await consumer.commit(offsets)
    finally:
        await consumer.stop()


async def logic_cpu_split(template: dict[str, Any], events: int) -> dict[str, float]:
    """CPU ms per event, in this process and without Kafka, of fhir.resources validation alone
    and of ingest's whole logic (``IngestService.handle`` with publishers that only serialise):
    the part of ingest's cost that no transport change can remove."""
    messages = [value for _, value, _, _ in bench_events(template, events + 20, f"c{run_id()}")]

    async def serialise(
        requests: Sequence[Outgoing], states: Sequence[PatientReadingsUpdated], payloads: int
    ) -> list[int | None]:
        for item in requests:
            to_wire(item.request)
        for state in states:
            to_wire(state)
        return [None] * len(states)

    service = IngestService(
        specs=load_specs(repo_root() / "deploy" / "models"),
        pseudonymize=Pseudonymizer(b"bench-pseudonym-key"),
        producer=Producer(service="bench", instance="logic"),
        store=ReadingsStore(),
        publish=serialise,
        limits=Limits(),
        lookback=timedelta(hours=4),
    )
    context = Context(SourceContext(channel="kafka"))
    for value in messages[:20]:  # warm: unit registry, model classes
        Bundle.model_validate_json(value)
        await service.handle(value, context, utc_now())
    started = time.process_time()
    for value in messages[20:]:
        Bundle.model_validate_json(value)
    validation = time.process_time() - started
    started = time.process_time()
    for value in messages[20:]:
        await service.handle(value, context, utc_now())
    logic = time.process_time() - started
    return {
        "fhir.resources validation alone": validation / events * 1000,
        "ingest logic without Kafka": logic / events * 1000,
    }


async def run_ingest(stack: Stack, template: dict[str, Any], events: int = 500) -> dict[str, Any]:
    """Plain loop first, then ingest alone, with bursts of the same Bundles."""
    bootstrap = stack.config.bootstrap
    run = run_id()
    source, sink = f"bench.ingest.{run}.in", f"bench.ingest.{run}.out"
    partitions = stack.config.partitions
    await create_topics(bootstrap, [TopicSpec(source, partitions), TopicSpec(sink, partitions)])
    plain = subprocess.Popen(  # noqa: ASYNC220 -- our own module; Popen returns at once
        [sys.executable, "-m", "medmesh_cli.bench.ingest", bootstrap, source, sink],
        stdout=subprocess.PIPE,
    )
    try:
        if plain.stdout is not None:
            await asyncio.to_thread(plain.stdout.readline)  # "ready"
        await _burst(bootstrap, source, sink, bench_events(template, 30, f"w{run}"), "warm", None)
        loop, loop_missing, loop_cpu = await _burst(
            bootstrap,
            source,
            sink,
            bench_events(template, events, f"p{run}"),
            "plain loop (fhir.resources R4B + aiokafka)",
            plain.pid,
        )
    finally:
        plain.terminate()
        await asyncio.to_thread(plain.wait, 10)
    stack.services[ROUTER].stop(grace_s=10)
    try:
        ingest = stack.services["ingest"]
        result, missing, cpu = await _burst(
            bootstrap,
            topics.FHIR_INBOUND,
            topics.INFERENCE_REQUESTS,
            bench_events(template, events, f"i{run}"),
            "ingest (medmesh.fhir.inbound -> requests)",
            ingest.pid,
        )
    finally:
        await _skip_router_backlog(bootstrap)
        await asyncio.to_thread(stack.restart_service, ROUTER)
    ratios: list[Ratio] = [ratio("ingest / plain loop", result.per_second, loop.per_second, 0.7)]
    return {
        "series": [loop.as_dict(), result.as_dict()],
        "cpu_ms_per_event": {loop.name: loop_cpu * 1000, result.name: cpu * 1000},
        "logic_cpu_ms_per_event": await logic_cpu_split(template, min(events, 1000)),
        "missing": {loop.name: loop_missing, result.name: missing},
        "ratios": [r.as_dict() for r in ratios],
    }


def ingest_markdown(report: dict[str, Any]) -> str:
    """The ingest section."""
    rows = [Summary(**s) for s in report["series"]]
    cpu = ", ".join(f"{name}: {ms:.2f} ms" for name, ms in report["cpu_ms_per_event"].items())
    split = report.get("logic_cpu_ms_per_event", {})
    logic = ", ".join(f"{name}: {ms:.2f} ms" for name, ms in split.items())
    return (
        markdown_table(rows, baseline=rows[0].name)
        + f"\nCPU per event (process user + system): {cpu}. Missing: {report['missing']}.\n"
        + (f"\nIn one process, without Kafka, CPU per event: {logic}.\n" if split else "")
        + "\n"
        + ratios_markdown(report["ratios"])
    )


if __name__ == "__main__":
    asyncio.run(plain_loop(*sys.argv[1:4]))
