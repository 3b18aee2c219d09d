"""Heartbeats: every few seconds, probe Triton and tell medmesh.models.status what this worker is.

The probe also feeds the worker: a version found not ready trips its circuit breaker before any
call fails, so the worker pauses even while no tasks arrive. A missed heartbeat (Kafka down) is
logged and the next one is tried on time: silence is itself the signal the router acts on.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime

from medmesh_contracts.events import Producer, WorkerHeartbeat
from medmesh_inference.worker import TaskWorker, WorkerState
from medmesh_runtime.logging import get_logger

log = get_logger("medmesh.inference.heartbeat")

Probe = Callable[[], Awaitable[bool]]
PublishHeartbeat = Callable[[WorkerHeartbeat], Awaitable[None]]


@dataclass(frozen=True)
class HeartbeatSource:
    """Who is beating: one worker instance of one model version."""

    producer: Producer
    model: str
    model_version: int
    interval_s: float


def worker_state(worker: TaskWorker) -> WorkerState:
    """starting until consuming; ready with a closed circuit; degraded otherwise; stopping."""
    if worker.state == "stopping":
        return "stopping"
    if not worker.consuming:
        return "starting"
    return "ready" if worker.breaker.closed else "degraded"


def build_heartbeat(
    source: HeartbeatSource,
    worker: TaskWorker,
    triton_ready: bool,
    device_kind: str,
    now: datetime,
) -> WorkerHeartbeat:
    """The heartbeat describing ``worker`` now (correlation id: the instance, one per worker)."""
    return WorkerHeartbeat(
        correlation_id=source.producer.instance,
        producer=source.producer,
        occurred_at=now,
        model=source.model,
        model_version=source.model_version,
        instance=source.producer.instance,
        state=worker_state(worker),
        triton_ready=triton_ready,
        circuit=worker.breaker.state,
        device_kind=device_kind,
        interval_s=source.interval_s,
        sent_at=now,
    )


class HealthMonitor:
    """Probes Triton and publishes a heartbeat every ``interval_s`` until stopped."""

    def __init__(
        self,
        source: HeartbeatSource,
        worker: TaskWorker,
        probe: Probe,
        publish: PublishHeartbeat,
        device_kind: Callable[[], str],
        now: Callable[[], datetime],
        publish_timeout_s: float = 5.0,
    ) -> None:
        self.source = source
        self.worker = worker
        self._probe = probe
        self._publish = publish
        self._device_kind = device_kind
        self._now = now
        self._publish_timeout_s = publish_timeout_s
        self._stopping = asyncio.Event()
        self.sent = 0

    async def beat(self) -> WorkerHeartbeat:
        """Probe once, tell the worker, publish one heartbeat; returns it."""
        ready = await self._probe()
        if self.worker.consuming:
            self.worker.report_triton_ready(ready)
        heartbeat = build_heartbeat(
            self.source, self.worker, ready, self._device_kind(), self._now()
        )
        try:
            await asyncio.wait_for(self._publish(heartbeat), timeout=self._publish_timeout_s)
            self.sent += 1
        except Exception as exc:  # noqa: BLE001 -- a missed heartbeat is reported by its absence
            log.warning("heartbeat not published", error=f"{type(exc).__name__}: {exc}")
        return heartbeat

    async def run(self) -> None:
        """Beat every ``interval_s`` until ``stop``."""
        while not self._stopping.is_set():
            await self.beat()
            try:
                await asyncio.wait_for(self._stopping.wait(), timeout=self.source.interval_s)
            except TimeoutError:
                continue

    def stop(self) -> None:
        """End ``run`` after the current beat."""
        self._stopping.set()
