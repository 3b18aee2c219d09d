"""Consumer lag per partition on /metrics, measured the way KEDA and `medmesh status` do:
the partition's end offset minus the group's committed offset, sampled every few seconds."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable

from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient
from opentelemetry.metrics import CallbackOptions, Observation

from medmesh_runtime.kafka import aiokafka_security
from medmesh_runtime.logging import get_logger
from medmesh_runtime.metrics import meter
from medmesh_runtime.settings import ServiceSettings

log = get_logger("medmesh.lag")


class LagMonitor:
    """Samples one consumer group's lag in the background and serves it as a gauge."""

    def __init__(self, settings: ServiceSettings, group_id: str, interval_s: float = 5.0) -> None:
        self._bootstrap = settings.kafka_bootstrap_servers
        self._security = aiokafka_security(settings)
        self._group = group_id
        self._interval_s = interval_s
        self._lags: dict[tuple[str, int], int] = {}
        self._task: asyncio.Task[None] | None = None
        self._admin: AIOKafkaAdminClient | None = None
        self._consumer: AIOKafkaConsumer | None = None
        meter("medmesh.lag").create_observable_gauge(
            "medmesh.consumer.lag",
            callbacks=[self._observe],
            unit="{message}",
            description="End offset minus committed offset, per consumer group and partition",
        )

    def _observe(self, _options: CallbackOptions) -> Iterable[Observation]:
        for (topic, partition), lag in sorted(self._lags.items()):
            yield Observation(
                lag, {"consumer_group": self._group, "topic": topic, "partition": str(partition)}
            )

    async def sample(self) -> dict[tuple[str, int], int]:
        """Measure the group's lag now (also what the gauge reports until the next sample)."""
        admin, consumer = await self._clients()
        committed = await admin.list_consumer_group_offsets(self._group)
        if committed:
            ends = await consumer.end_offsets(list(committed))
            self._lags = {
                (tp.topic, tp.partition): max(0, ends[tp] - meta.offset)
                for tp, meta in committed.items()
            }
        return dict(self._lags)

    async def _clients(self) -> tuple[AIOKafkaAdminClient, AIOKafkaConsumer]:
        # Connected once and kept: a sample every few seconds must not reconnect every time.
        if self._admin is None or self._consumer is None:
            admin = AIOKafkaAdminClient(bootstrap_servers=self._bootstrap, **self._security)
            consumer = AIOKafkaConsumer(
                bootstrap_servers=self._bootstrap, enable_auto_commit=False, **self._security
            )
            await admin.start()
            try:
                await consumer.start()
            except BaseException:
                await admin.close()
                raise
            self._admin, self._consumer = admin, consumer
        return self._admin, self._consumer

    async def _close_clients(self) -> None:
        admin, consumer = self._admin, self._consumer
        self._admin = self._consumer = None
        if consumer is not None:
            await consumer.stop()
        if admin is not None:
            await admin.close()

    async def _run(self) -> None:
        while True:
            try:
                await self.sample()
            except Exception as exc:  # noqa: BLE001 -- a missed sample keeps the last figures; logged
                # Reconnect on the next sample; closing a broken connection may fail too, and
                # that failure says nothing the warning below does not.
                with contextlib.suppress(Exception):
                    await self._close_clients()
                log.warning(
                    "consumer lag sample failed",
                    group=self._group,
                    error=f"{type(exc).__name__}: {exc}",
                )
            await asyncio.sleep(self._interval_s)

    async def start(self) -> None:
        """Start sampling in the background."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"lag-{self._group}")

    async def stop(self) -> None:
        """Stop sampling."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._close_clients()
