"""Issue 4: the router's cost per message, against a pass-through on the same broker.

- pass-through: a raw aiokafka consumer -> producer relay of the same RequestInference bytes,
  one send acknowledged at a time (what the router's handler does), 3 partitions in and out;
- router: the same burst published to medmesh.inference.requests, timed until each request's
  RunInference is on a deterioration task topic (first copy per correlation id; shadows ignored),
  with the workers and reporting paused meanwhile (see ``downstream_paused``).

Target: the router reaches at least 80% of the pass-through's throughput.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from aiokafka import AIOKafkaProducer

from medmesh_cli.bench.common import (
    Message,
    Ratio,
    Sink,
    bench_request,
    burst_summary,
    header_value,
    publish_burst,
    ratio,
    ratios_markdown,
    run_id,
)
from medmesh_cli.bench.hop import _raw_relay
from medmesh_cli.bench.stats import Summary, markdown_table
from medmesh_cli.devstack.stack import Stack
from medmesh_cli.devstack.topics import create_topics
from medmesh_contracts import headers as h
from medmesh_contracts import topics
from medmesh_contracts.events import RequestInference, routing_headers, schema_of, to_wire
from medmesh_contracts.modelspec import load_specs
from medmesh_contracts.topics import TopicSpec


@contextmanager
def downstream_paused(stack: Stack) -> Iterator[None]:
    """Workers and reporting stopped (SIGSTOP) for the router's burst, continued afterwards.

    The pass-through's burst has nothing downstream of it; the router's tasks would otherwise be
    scored and reported on the same two cores while the router is timed, so the ratio would
    measure the whole pipeline's CPU rather than the router's. Stable keeps its bucket range
    while its workers miss heartbeats (routing.build_table), so routing itself is unchanged.
    """
    paused = [name for name in stack.services if name not in ("ingest", "router")]
    for name in paused:
        stack.services[name].signal(signal.SIGSTOP)
    try:
        yield
    finally:
        for name in paused:
            stack.services[name].signal(signal.SIGCONT)


def request_messages(count: int, run: str) -> list[Message]:
    """(id, value, key, headers) of ``count`` RequestInference, as ingest publishes them."""
    messages: list[Message] = []
    for i in range(count):
        request = bench_request(i, run)
        headers = [
            (h.CORRELATION_ID, request.correlation_id.encode()),
            (h.SCHEMA, schema_of(RequestInference).encode()),
            *((name, value.encode()) for name, value in routing_headers(request).items()),
        ]
        messages.append(
            (
                request.correlation_id,
                to_wire(request),
                request.patient_pseudonym.encode(),
                headers,
            )
        )
    return messages


async def _burst(
    bootstrap: str, source: str, sinks: list[str], count: int, label: str
) -> tuple[Summary, int]:
    sink = Sink(bootstrap, sinks, lambda r: header_value(r, h.CORRELATION_ID))
    await sink.start()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True)
    await producer.start()
    try:
        sent = await publish_burst(producer, source, request_messages(count, run_id()))
        missing = await sink.wait_for(sent, timeout_s=60 + count / 20)
    finally:
        await producer.stop()
        await sink.stop()
    return burst_summary(label, sent, sink.arrived), missing


async def run_router(stack: Stack, messages: int = 2000) -> dict[str, Any]:
    """Pass-through first, then the router, with the same burst of requests."""
    bootstrap = stack.config.bootstrap
    run = run_id()
    source, sink = f"bench.router.{run}.in", f"bench.router.{run}.out"
    partitions = stack.config.partitions
    await create_topics(bootstrap, [TopicSpec(source, partitions), TopicSpec(sink, partitions)])
    stop = await _raw_relay(bootstrap, source, sink)
    try:
        await _burst(bootstrap, source, [sink], 50, "warm-up")
        passthrough, pt_missing = await _burst(
            bootstrap, source, [sink], messages, "raw aiokafka pass-through"
        )
    finally:
        await stop()
    task_topics = [
        topics.model_task_topic(spec.name, v.version)
        for spec in load_specs(stack.config.specs_dir).values()
        for v in spec.versions
    ]
    with downstream_paused(stack):
        router, missing = await _burst(
            bootstrap, topics.INFERENCE_REQUESTS, task_topics, messages, "router"
        )
    ratios: list[Ratio] = [
        ratio("router / pass-through", router.per_second, passthrough.per_second, 0.8)
    ]
    per_message_us = (1 / router.per_second - 1 / passthrough.per_second) * 1e6
    return {
        "series": [passthrough.as_dict(), router.as_dict()],
        "missing": {"pass-through": pt_missing, "router": missing},
        "overhead_us_per_message": per_message_us,
        "ratios": [r.as_dict() for r in ratios],
    }


def router_markdown(report: dict[str, Any]) -> str:
    """The router section."""
    rows = [Summary(**s) for s in report["series"]]
    return (
        markdown_table(rows, baseline=rows[0].name)
        + f"\nRouter overhead: {report['overhead_us_per_message']:.0f} us per message "
        f"(1/throughput difference); missing: {report['missing']}.\n\n"
        + ratios_markdown(report["ratios"])
    )
