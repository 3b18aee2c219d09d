"""Open-loop load through the whole pipeline (HTTP -> ingest ... reporting -> report topic).

Arrivals are scheduled at a fixed rate whatever the responses do (no coordinated omission):
each event is sent by its own task at its planned time, and its latency is measured from that
planned time, so a slow pipeline shows up as latency instead of as fewer requests.

A load given ``give_up_past_ms`` (the topology bench's capacity probes) is abandoned once so many
of its events have waited longer than that for their report that its p99 can no longer be within
it (``p99_beyond``): an overloaded probe then stops sending at once instead of queueing minutes
of requests behind the HTTP client's connections and ingest's timeouts.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
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
    # Seconds after the first send at which the load was given up (None: sent to the end).
    abandoned_after_s: float | None = None


def p99_beyond(late: int, expected: int) -> bool:
    """Whether ``late`` latencies above a bound, out of ``expected``, put the p99 (nearest rank,
    as ``stats.percentile``) above it whatever the others turn out to be."""
    return expected > 0 and late > expected - math.ceil(0.99 * expected)


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


@dataclass
class _Tally:
    """What one load has sent, been answered and seen reported so far."""

    events: int
    # Correlation id -> planned send time of its event (2xx answers only).
    planned: dict[str, float] = field(default_factory=dict)
    # Correlation id -> when its report arrived.
    arrived: dict[str, float] = field(default_factory=dict)
    # Event index -> planned send time, while its request waits for an answer.
    unanswered: dict[int, float] = field(default_factory=dict)
    http_ms: list[float] = field(default_factory=list)
    non_2xx: int = 0
    # Sends that got an answer (any status) or a transport error: the rest were never sent.
    finished: int = 0
    accepted: int = 0

    def late(self, past_ms: float, now: float | None = None) -> int:
        """Sends unanswered and reports not arrived whose planned time is over ``past_ms`` ago."""
        before = (time.perf_counter() if now is None else now) - past_ms / 1000
        return sum(1 for at in self.unanswered.values() if at < before) + sum(
            1 for c, at in self.planned.items() if at < before and c not in self.arrived
        )

    def hopeless(self, past_ms: float, now: float | None = None) -> bool:
        """Whether the load's p99 is certain to exceed ``past_ms`` already."""
        # Reports per accepted event (a Bundle may be scored by several models).
        per_event = max(1.0, len(self.planned) / self.accepted) if self.accepted else 1.0
        return p99_beyond(self.late(past_ms, now), math.ceil(per_event * self.events))

    @property
    def missing(self) -> int:
        """Reports not arrived, and events never sent or answered (a load given up)."""
        return len(set(self.planned) - set(self.arrived)) + self.events - self.finished


async def run_load(
    ingest_url: str,
    bootstrap: str,
    events: list[bytes],
    rate_per_s: float,
    settle_s: float = 20.0,
    on_answer: Callable[[], None] | None = None,
    give_up_past_ms: float | None = None,
) -> PipelineResult:
    """Send ``events`` at ``rate_per_s`` and wait up to ``settle_s`` for their reports;
    ``on_answer()`` after each HTTP answer (``medmesh load`` counts them in a progress bar).
    With ``give_up_past_ms``: stop sending once the p99 is certain to exceed it."""
    tally = _Tally(len(events))
    planned, arrived = tally.planned, tally.arrived
    consumer = await _reports_at_end(bootstrap)

    async def collect() -> None:
        async for record in consumer:
            correlation_id = record_headers(record).get(h.CORRELATION_ID)
            if correlation_id is not None:
                arrived.setdefault(correlation_id, time.perf_counter())

    collector = asyncio.create_task(collect())
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=50)
    async with httpx.AsyncClient(base_url=ingest_url, timeout=60, limits=limits) as client:

        async def send(index: int, payload: bytes, at: float) -> None:
            await asyncio.sleep(max(0.0, at - time.perf_counter()))
            tally.unanswered[index] = at
            try:
                response = await client.post(
                    "/fhir", content=payload, headers={"content-type": "application/fhir+json"}
                )
            except httpx.HTTPError:
                # An overloaded pipeline may drop or refuse the connection: a failed send,
                # counted with the non-2xx answers (the level is then not sustained).
                tally.finished += 1
                tally.non_2xx += 1
                return
            finally:
                tally.unanswered.pop(index, None)  # also when the load is given up (cancelled)
            tally.finished += 1
            tally.http_ms.append((time.perf_counter() - at) * 1000)
            if on_answer is not None:
                on_answer()
            if response.status_code // 100 != 2:
                tally.non_2xx += 1
                return
            tally.accepted += 1
            for correlation_id in response.headers.get(h.CORRELATION_ID, "").split(","):
                if correlation_id:
                    planned[correlation_id] = at

        start = time.perf_counter() + 0.2
        sends = asyncio.gather(*(send(i, p, start + i / rate_per_s) for i, p in enumerate(events)))
        given_up = await _sent_or_given_up(
            sends, None if give_up_past_ms is None else lambda: tally.hopeless(give_up_past_ms)
        )
        if given_up is not None:
            settle_s = 0.0  # its verdict is known: the backlog is drain()'s to wait out
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
        http=summarize(f"HTTP 202 @ {rate_per_s:g}/s", tally.http_ms, duration),
        missing=tally.missing,
        non_2xx=tally.non_2xx,
        correlation_ids=tuple(planned),
        latencies_ms=tuple(latencies),
        abandoned_after_s=None if given_up is None else given_up - start,
    )


async def _sent_or_given_up(
    sends: asyncio.Future[Any], hopeless: Callable[[], bool] | None
) -> float | None:
    """Wait for every send; with ``hopeless``, cancel the rest once it says so and return when
    (perf_counter), else None."""
    if hopeless is None:
        await sends
        return None
    while not sends.done():
        await asyncio.wait([sends], timeout=0.25)
        if not sends.done() and hopeless():
            given_up = time.perf_counter()
            sends.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sends
            return given_up
    sends.result()  # a send's own error is raised, as without giving up
    return None


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
