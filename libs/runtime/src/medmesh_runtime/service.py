"""The skeleton every medmesh service is built on: one ``create_app`` shape.

A service's ``create_app(settings, ...)`` calls ``ServiceRuntime.build`` (logging, tracing, the
faststream broker, consumer-lag sampling for its group), builds its own parts, and returns
``runtime.app(...)`` (router, inference, reporting) with its lifespan hooks, or mounts the same
runtime into its own ASGI app (ingest's FastAPI app uses ``start``, ``stop`` and
``health.health_routes``). What every
service shares is started and stopped here, in one order: the service's hooks start after
Kafka connected and stop before the broker closes; lag sampling runs in between; traces are
flushed last.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from faststream.asgi import AsgiFastStream
from faststream.asgi.handlers import GetHandler
from faststream.kafka import KafkaBroker
from opentelemetry.sdk.trace import TracerProvider

from medmesh_runtime.health import Check, health_routes
from medmesh_runtime.kafka import build_broker
from medmesh_runtime.lag import LagMonitor
from medmesh_runtime.logging import configure_logging
from medmesh_runtime.settings import ServiceSettings
from medmesh_runtime.telemetry import configure_service_tracing

Hook = Callable[[], Awaitable[None]]


@dataclass(frozen=True)
class ServiceRuntime:
    """What every service process has: its name, settings, tracing, broker and lag sampling."""

    name: str
    settings: ServiceSettings
    tracer_provider: TracerProvider
    broker: KafkaBroker
    lag: LagMonitor

    @classmethod
    def build(
        cls, name: str, settings: ServiceSettings, group_id: str, *, trace_name: str | None = None
    ) -> ServiceRuntime:
        """Configure logging and tracing for ``name`` and build its broker (nothing connects
        yet); ``group_id`` is the consumer group whose lag is sampled; ``trace_name`` names the
        process in traces when it differs (a worker names its model version)."""
        configure_logging(name, settings.log_level)
        tracer_provider = configure_service_tracing(trace_name or name, settings)
        broker = build_broker(settings, name, tracer_provider)
        return cls(name, settings, tracer_provider, broker, LagMonitor(settings, group_id))

    async def start(self) -> None:
        """What a service that is not a faststream app starts itself (after its broker)."""
        await self.lag.start()

    async def stop(self) -> None:
        """The counterpart of ``start``, and the traces flushed."""
        await self.lag.stop()
        self.tracer_provider.shutdown()

    def app(
        self,
        *,
        ready: Check | None = None,
        routes: Sequence[tuple[str, GetHandler]] = (),
        on_startup: Sequence[Hook] = (),
        after_startup: Sequence[Hook] = (),
        on_shutdown: Sequence[Hook] = (),
    ) -> AsgiFastStream:
        """The service's ASGI app: /healthz, /readyz (Kafka up and ``ready``) and ``routes``;
        ``on_startup`` before Kafka connects, ``after_startup`` once it has, ``on_shutdown``
        before it closes."""

        async def flush_traces() -> None:
            self.tracer_provider.shutdown()

        return AsgiFastStream(
            self.broker,
            asgi_routes=[*health_routes(self.broker, ready), *routes],
            on_startup=list(on_startup),
            after_startup=[*after_startup, self.lag.start],
            on_shutdown=[self.lag.stop, *on_shutdown, flush_traces],
            logger=logging.getLogger(f"medmesh.{self.name}.app"),
        )
