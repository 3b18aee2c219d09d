"""Open-loop load through the whole pipeline (HTTP -> ingest ... reporting -> report topic).

Arrivals are scheduled at a fixed rate whatever the responses do (no coordinated omission):
each event is sent by its own task at its planned time, and its latency is measured from that
planned time, so a slow pipeline shows up as latency instead of as fewer requests.
"""

from __future__ import annotations

import asyncio
import copy
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from aiokafka import AIOKafkaConsumer, TopicPartition

from medmesh_cli.bench.stats import Summary, summarize
from medmesh_contracts import headers as h
from medmesh_contracts import topics
from medmesh_runtime.kafka import record_headers

# LOINC code -> (low, high) plausible range, for vital-sign values drawn per event
_RANGES = {
    "9279-1": (8.0, 30.0),
    "59408-5": (86.0, 100.0),
    "8867-4": (40.0, 140.0),
    "8480-6": (85.0, 190.0),
}


@dataclass(frozen=True)
class PipelineResult:
    """End-to-end and HTTP latency of one load level, and what did not come back."""

    offered_per_s: float
    end_to_end: Summary
    http: Summary
    missing: int
    non_2xx: int
    # The correlation ids ingest answered with (for per-hop figures from the level's traces).
    correlation_ids: tuple[str, ...] = ()
    # Every end-to-end latency, for percentiles pooled over several levels.
    latencies_ms: tuple[float, ...] = ()


def vitals_events(
    template: dict[str, Any], patients: int, count: int, seed: int = 7, prefix: str = "bench"
) -> list[bytes]:
    """``count`` Bundles over ``patients`` patients, with vital values varied per event."""
    rng = random.Random(seed)  # noqa: S311 -- reproducible test data, not secrets
    events = []
    for i in range(count):
        bundle = copy.deepcopy(template)
        patient = f"{prefix}-{i % patients}"
        for entry in bundle["entry"]:
            resource = entry["resource"]
            if resource["resourceType"] == "Patient":
                resource["id"] = patient
            for key in ("subject", "patient"):
                if isinstance(resource.get(key), dict):
                    resource[key]["reference"] = f"Patient/{patient}"
            codes = {c.get("code") for c in resource.get("code", {}).get("coding", [])}
            for code, (low, high) in _RANGES.items():
                if code in codes and "valueQuantity" in resource:
                    resource["valueQuantity"]["value"] = round(rng.uniform(low, high))
        events.append(json.dumps(bundle).encode())
    return events


async def run_load(
    ingest_url: str,
    bootstrap: str,
    events: list[bytes],
    rate_per_s: float,
    settle_s: float = 20.0,
    on_answer: Callable[[], None] | None = None,
) -> PipelineResult:
    """Send ``events`` at ``rate_per_s`` and wait up to ``settle_s`` for their reports;
    ``on_answer()`` after each HTTP answer (``medmesh load`` counts them in a progress bar)."""
    planned: dict[str, float] = {}
    arrived: dict[str, float] = {}
    http_ms: list[float] = []
    non_2xx = 0
    consumer = await _reports_at_end(bootstrap)

    async def collect() -> None:
        async for record in consumer:
            correlation_id = record_headers(record).get(h.CORRELATION_ID)
            if correlation_id is not None:
                arrived.setdefault(correlation_id, time.perf_counter())

    collector = asyncio.create_task(collect())
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=50)
    async with httpx.AsyncClient(base_url=ingest_url, timeout=60, limits=limits) as client:

        async def send(payload: bytes, at: float) -> None:
            nonlocal non_2xx
            await asyncio.sleep(max(0.0, at - time.perf_counter()))
            try:
                response = await client.post(
                    "/fhir", content=payload, headers={"content-type": "application/fhir+json"}
                )
            except httpx.HTTPError:
                # An overloaded pipeline may drop or refuse the connection: a failed send,
                # counted with the non-2xx answers (the level is then not sustained).
                non_2xx += 1
                return
            http_ms.append((time.perf_counter() - at) * 1000)
            if on_answer is not None:
                on_answer()
            if response.status_code // 100 != 2:
                non_2xx += 1
                return
            for correlation_id in response.headers.get(h.CORRELATION_ID, "").split(","):
                if correlation_id:
                    planned[correlation_id] = at

        start = time.perf_counter() + 0.2
        await asyncio.gather(*(send(p, start + i / rate_per_s) for i, p in enumerate(events)))
        duration = time.perf_counter() - start
    deadline = time.perf_counter() + settle_s
    while set(planned) - set(arrived) and time.perf_counter() < deadline:  # noqa: ASYNC110 -- polls two dicts filled by other tasks
        await asyncio.sleep(0.1)
    collector.cancel()
    await consumer.stop()
    latencies = [(arrived[c] - t) * 1000 for c, t in planned.items() if c in arrived]
    span = max((arrived[c] for c in planned if c in arrived), default=start) - start
    return PipelineResult(
        offered_per_s=rate_per_s,
        end_to_end=summarize(f"end-to-end @ {rate_per_s:g}/s", latencies, max(span, duration)),
        http=summarize(f"HTTP 202 @ {rate_per_s:g}/s", http_ms, duration),
        missing=len(set(planned) - set(arrived)),
        non_2xx=non_2xx,
        correlation_ids=tuple(planned),
        latencies_ms=tuple(latencies),
    )


async def _reports_at_end(bootstrap: str) -> AIOKafkaConsumer:
    """A reader of every partition of the reports topic from its current end.

    No consumer group: a loaded benchmark client that misses heartbeats would be thrown out of
    its group and see reports late after re-joining, which reads as pipeline latency.
    """
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, isolation_level="read_committed", enable_auto_commit=False
    )
    await consumer.start()
    found: set[int] = set()
    for _ in range(50):
        await consumer._client.force_metadata_update()  # aiokafka has no public metadata refresh
        found = consumer.partitions_for_topic(topics.REPORTS_DIAGNOSTIC) or set()
        if found:
            break
        await asyncio.sleep(0.1)
    partitions = [TopicPartition(topics.REPORTS_DIAGNOSTIC, p) for p in sorted(found)]
    consumer.assign(partitions)
    await consumer.seek_to_end(*partitions)
    for partition in partitions:
        await consumer.position(partition)  # resolve "end" now, before the first send
    return consumer


def load_template(path: Path) -> dict[str, Any]:
    """A vitals Bundle to vary (the high-risk fixture by default)."""
    template: dict[str, Any] = json.loads(path.read_text())
    return template
