"""Helpers the service-level series share: test payloads, a sink that times arrivals, ratios."""

from __future__ import annotations

import asyncio
import math
import os
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient

from medmesh_cli.bench.stats import Summary, summarize
from medmesh_contracts.events import (
    ModelInput,
    Producer,
    RequestInference,
    RouteDecision,
    RunInference,
    SourceContext,
)
from medmesh_runtime.kafka import record_headers

EFFECTIVE_AT = datetime(2026, 11, 23, 8, 30, tzinfo=UTC)
# (name, value, unit) in the deterioration spec's input order: NEWS2 7, as tests/factories.py.
VITAL_SIGNS: tuple[tuple[str, float, str], ...] = (
    ("respiratory_rate", 22.0, "/min"),
    ("spo2", 95.0, "%"),
    ("supplemental_oxygen", 0.0, "1"),
    ("temperature", 38.4, "Cel"),
    ("systolic_bp", 105.0, "mm[Hg]"),
    ("heart_rate", 112.0, "/min"),
    ("not_alert", 0.0, "1"),
)
Identify = Callable[[Any], str | None]
# (id, value, key, headers) of one message a series sends
Message = tuple[str, bytes, bytes | None, list[tuple[str, bytes]]]


def bench_request(index: int, run: str, model: str = "deterioration") -> RequestInference:
    """A RequestInference as ingest would publish it, with a correlation id unique per run."""
    return RequestInference(
        correlation_id=f"bench-{run}-{index}",
        producer=Producer(service="ingest", instance="bench"),
        occurred_at=EFFECTIVE_AT + timedelta(seconds=2),
        model=model,
        patient_pseudonym=f"pseudo-bench-{index % 997}",
        subject_reference=f"Patient/bench-{index % 997}",
        inputs=tuple(
            ModelInput(
                name=name,
                value=value + (index % 5 if name == "heart_rate" else 0),
                unit=unit,
                observed_at=EFFECTIVE_AT,
            )
            for name, value, unit in VITAL_SIGNS
        ),
        effective_at=EFFECTIVE_AT,
        received_at=EFFECTIVE_AT + timedelta(seconds=1),
        source=SourceContext(channel="kafka", site="bench", source_system="bench"),
    )


def bench_task(index: int, run: str, model_version: int = 1) -> RunInference:
    """A RunInference as the router would send it to one model version's workers."""
    request = bench_request(index, run)
    return RunInference(
        correlation_id=request.correlation_id,
        producer=Producer(service="router", instance="bench"),
        occurred_at=request.occurred_at + timedelta(milliseconds=5),
        model_version=model_version,
        route=RouteDecision(reason="static-table"),
        routed_at=request.occurred_at + timedelta(milliseconds=5),
        request=request,
    )


def header_value(record: Any, name: str) -> str | None:
    """One header of a consumed record, as text (None when absent)."""
    return record_headers(record).get(name)


def run_id() -> str:
    """A short id that keeps one run's topics, groups and keys apart from another's."""
    return uuid.uuid4().hex[:8]


class Sink:
    """Times the arrival of records on some topics, by an id taken from each record.

    It starts at the topics' current end (the records of earlier series are not counted) and
    keeps the first arrival of each id only (redeliveries and shadow copies count once).
    """

    def __init__(self, bootstrap: str, topics: Iterable[str], identify: Identify) -> None:
        self.arrived: dict[str, float] = {}
        self._identify = identify
        self._consumer = AIOKafkaConsumer(
            *topics,
            bootstrap_servers=bootstrap,
            group_id=f"bench-sink-{run_id()}",
            auto_offset_reset="latest",
            isolation_level="read_committed",
        )
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Join, pin the start offsets, then collect in the background."""
        await self._consumer.start()
        deadline = time.monotonic() + 30
        while not self._consumer.assignment() and time.monotonic() < deadline:
            await self._consumer.getmany(timeout_ms=200)
        for partition in self._consumer.assignment():
            await self._consumer.position(partition)
        self._task = asyncio.create_task(self._collect())

    async def _collect(self) -> None:
        while True:
            batch = await self._consumer.getmany(timeout_ms=500)
            now = time.perf_counter()
            for records in batch.values():
                for record in records:
                    key = self._identify(record)
                    if key is not None:
                        self.arrived.setdefault(key, now)

    async def wait_for(self, ids: Iterable[str], timeout_s: float) -> int:
        """Wait until every id has arrived (or the timeout); the number still missing."""
        wanted = set(ids)
        deadline = time.perf_counter() + timeout_s
        while wanted - self.arrived.keys() and time.perf_counter() < deadline:  # noqa: ASYNC110 -- polls a dict another task fills
            await asyncio.sleep(0.05)
        return len(wanted - self.arrived.keys())

    async def stop(self) -> None:
        """Stop collecting."""
        if self._task is not None:
            self._task.cancel()
        await self._consumer.stop()


async def publish_burst(
    producer: AIOKafkaProducer,
    topic: str,
    messages: Sequence[Message],
) -> dict[str, float]:
    """Send (id, value, key, headers) as fast as the producer takes them; id -> send time."""
    sent: dict[str, float] = {}
    futures = []
    for ident, value, key, headers in messages:
        sent[ident] = time.perf_counter()
        futures.append(await producer.send(topic, value, key=key, headers=headers))
    await asyncio.gather(*futures)
    return sent


def burst_summary(name: str, sent: dict[str, float], arrived: dict[str, float]) -> Summary:
    """Throughput (first send to last arrival) and per-message latency of one burst."""
    latencies = [(arrived[i] - t) * 1000 for i, t in sent.items() if i in arrived]
    if not sent:
        return summarize(name, [], 0.0)
    first = min(sent.values())
    last = max((arrived[i] for i in sent if i in arrived), default=first)
    return summarize(name, latencies, last - first)


def with_count(summary: Summary, count: int) -> Summary:
    """The same summary counting ``count`` items (rows, say) instead of its latencies."""
    per_second = count / summary.seconds if summary.seconds > 0 else math.nan
    return replace(summary, count=count, per_second=per_second)


@dataclass(frozen=True)
class Ratio:
    """One measured ratio against its target (a floor)."""

    name: str
    value: float
    target: float

    @property
    def met(self) -> bool:
        """Whether the ratio reaches its target."""
        return not math.isnan(self.value) and self.value >= self.target

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {**asdict(self), "met": self.met}


def ratio(name: str, numerator: float, denominator: float, target: float) -> Ratio:
    """numerator / denominator (NaN when the denominator is zero or NaN)."""
    value = numerator / denominator if denominator and not math.isnan(denominator) else math.nan
    return Ratio(name, value, target)


def ratios_markdown(ratios: Iterable[Ratio | dict[str, Any]]) -> str:
    """Ratios against their targets as a Markdown table."""
    lines = ["| ratio | measured | target | met |", "|---|---|---|---|"]
    for item in ratios:
        r = item if isinstance(item, Ratio) else Ratio(item["name"], item["value"], item["target"])
        target = f">= {r.target:g}x" if r.target >= 2 else f">= {r.target:.0%}"
        measured = f"{r.value:.2f}x" if r.target >= 2 else f"{r.value:.0%}"
        lines.append(f"| {r.name} | {measured} | {target} | {'yes' if r.met else 'no'} |")
    return "\n".join(lines) + "\n"


def process_cpu_s(pid: int | None, proc: Path = Path("/proc")) -> float:
    """User + system CPU seconds a process has used so far (Linux /proc; NaN elsewhere)."""
    if pid is None:
        return math.nan
    try:
        stat = (proc / str(pid) / "stat").read_text()
    except OSError:
        return math.nan
    return cpu_seconds_from_stat(stat, os.sysconf("SC_CLK_TCK"))


def cpu_seconds_from_stat(stat: str, ticks_per_s: int = 100) -> float:
    """utime + stime of a /proc/<pid>/stat line, in seconds (the name may contain spaces)."""
    fields = stat[stat.rindex(")") + 2 :].split()
    # fields[0] is the state (field 3); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / ticks_per_s


async def group_state(bootstrap: str, group: str) -> tuple[str, list[str]]:
    """A consumer group's state ("Stable", "PreparingRebalance", ...) and its members' client
    ids (medmesh's stages end theirs with the instance id; a member id changes on every rejoin)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        (response,) = await admin.describe_consumer_groups([group])
    finally:
        await admin.close()
    # DescribeGroups v0-v3 groups: (error_code, group, state, protocol_type, protocol, members);
    # a member starts with (member_id, client_id, ...).
    description = response.groups[0]
    return str(description[2]), [str(member[1]) for member in description[5]]
