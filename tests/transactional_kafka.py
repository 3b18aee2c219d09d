"""The in-memory, transaction-aware Kafka the transactional stages' unit and service tests run
on, and ``run_until``. The fake itself is ``medmesh_cli.bench.memory_kafka`` (the worker bench
runs on it too, and the cli cannot import tests/); it is named here for the tests.
"""

from __future__ import annotations

import asyncio
from typing import Any

from medmesh_cli.bench.memory_kafka import FakeConsumer, FakeKafka, FakeProducer, FakeRecord

__all__ = ["FakeConsumer", "FakeKafka", "FakeProducer", "FakeRecord", "run_until"]


async def run_until(loop: Any, done: Any, timeout_s: float = 10.0) -> None:
    """Run ``loop.run()`` until ``done()`` holds (or the loop returns); then cancel it."""
    task = asyncio.create_task(loop.run())
    try:
        async with asyncio.timeout(timeout_s):
            while not done():
                if task.done():
                    return
                await asyncio.sleep(0.01)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
