"""The router's cost per followed outcome, in process (issue 17): the followers as they are (the
consumed record as the handler's body) against the same followers taking faststream's
``KafkaMessage`` (one thread-pool round trip per message), and an empty body-only handler for
what the in-memory broker itself costs. Interleaved ABBA, three repetitions; CPU is the whole
process's (all threads), so the thread pool's work counts.

    python -m medmesh_cli.bench.followers [records per repetition]
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from unittest.mock import patch

from faststream.kafka import KafkaBroker, TestKafkaBroker
from faststream.kafka.annotations import KafkaMessage

from medmesh_cli.bench.common import EFFECTIVE_AT, bench_task
from medmesh_contracts import topics
from medmesh_contracts.events import InferenceCompleted, Producer, to_wire
from medmesh_router import app as router_app
from medmesh_router.app import Router
from medmesh_router.followers import Followers, Record, record_of
from medmesh_router.settings import RouterSettings
from medmesh_router.topic_reader import Consumed

SPECS = Path(__file__).resolve().parents[4] / "deploy" / "models"
VARIANTS = ("record body (now)", "KafkaMessage (before)", "empty handler (in-memory broker)")


class MessageFollowers(Followers):
    """The followers as they were: every outcome handler takes ``message: KafkaMessage``."""

    def subscribe(self, broker: KafkaBroker) -> None:
        """Register the outcome followers only, each taking the faststream message."""

        async def on_result(message: KafkaMessage) -> None:
            await self.on_result(message.raw_message)

        broker.subscriber(topics.INFERENCE_RESULTS)(on_result)


class EmptyFollowers(Followers):
    """A handler that does nothing with the record it gets (the same decoder): what the
    in-memory broker, faststream and the publishing side cost."""

    def subscribe(self, broker: KafkaBroker) -> None:
        """Register one body-only handler that ignores what it gets."""

        async def on_result(record: Record) -> None:
            del record

        broker.subscriber(topics.INFERENCE_RESULTS, decoder=record_of)(on_result)


class ResultFollowers(Followers):
    """The followers as they are, on the results topic only (like the other variants)."""

    def subscribe(self, broker: KafkaBroker) -> None:
        """Register the real result handler with the real decoder."""
        broker.subscriber(topics.INFERENCE_RESULTS, decoder=record_of)(self.on_result)


def _results(count: int) -> list[bytes]:
    completed_at = EFFECTIVE_AT + timedelta(seconds=3)
    producer = Producer(service="inference", instance="bench")
    return [
        to_wire(
            InferenceCompleted(
                correlation_id=task.correlation_id,
                producer=producer,
                occurred_at=completed_at,
                task=task,
                triton_model="deterioration",
                triton_version="1",
                outputs={"news2": (7.0,), "risk": (0.8,)},
                device_kind="cpu",
                batch_size=1,
                inference_ms=1.0,
                completed_at=completed_at,
            )
        )
        for task in (bench_task(i, "followers") for i in range(count))
    ]


async def _no_history(
    _settings: RouterSettings,
    _topic: str,
    since: datetime | None = None,
    apply: Callable[[Consumed], None] | None = None,
) -> list[Consumed]:
    return []


async def _cpu_per_record_us(kind: type[Followers], records: list[bytes]) -> float:
    # The Router builds and subscribes its Followers itself: swap the class it builds.
    with patch.object(router_app, "Followers", kind):
        router = Router(RouterSettings(model_specs_dir=SPECS, router_tick_s=3600), _no_history)
    await router.load()
    async with TestKafkaBroker(router.broker) as broker:
        for value in records[:100]:  # warm-up: first calls build pydantic and faststream caches
            await broker.publish(value, topic=topics.INFERENCE_RESULTS)
        started = time.process_time()
        for value in records:
            await broker.publish(value, topic=topics.INFERENCE_RESULTS)
        return (time.process_time() - started) / len(records) * 1e6


async def run_followers(records: int = 2000, repetitions: int = 3) -> dict[str, Any]:
    """Median and range of CPU µs per result for each variant, ABBA-interleaved."""
    values = _results(records)
    kinds = dict(zip(VARIANTS, (ResultFollowers, MessageFollowers, EmptyFollowers), strict=True))
    samples: dict[str, list[float]] = {name: [] for name in VARIANTS}
    order = list(VARIANTS) + list(reversed(VARIANTS))
    for _ in range(repetitions):
        for name in order:
            samples[name].append(await _cpu_per_record_us(kinds[name], values))
    return {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "records": records,
        "cpu_us_per_result": {
            name: {"median": statistics.median(s), "min": min(s), "max": max(s), "samples": s}
            for name, s in samples.items()
        },
    }


def main() -> None:
    """Print the figures."""
    records = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    report = asyncio.run(run_followers(records))
    for name, figures in report["cpu_us_per_result"].items():
        print(
            f"{name}: median {figures['median']:.0f} µs CPU per result "
            f"(range {figures['min']:.0f}-{figures['max']:.0f}, n={len(figures['samples'])})"
        )


if __name__ == "__main__":
    main()
