"""Steady request traffic for end-to-end tests that need a rollout to see requests."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator

from aiokafka import AIOKafkaProducer

from medmesh_cli.devstack.stack import Stack
from medmesh_contracts import headers as h
from medmesh_contracts import topics
from medmesh_contracts.events import RequestInference, routing_headers, schema_of, to_wire
from tests.factories import make_request


@contextlib.asynccontextmanager
async def steady_traffic(stack: Stack, rate_per_s: float, prefix: str) -> AsyncIterator[None]:
    """``rate_per_s`` deterioration requests a second, each of a new patient, while open."""
    producer = AIOKafkaProducer(bootstrap_servers=stack.config.bootstrap, acks="all")
    await producer.start()

    async def send() -> None:
        while True:
            request = make_request(
                patient_pseudonym=f"{prefix}-{uuid.uuid4().hex[:12]}",
                correlation_id=str(uuid.uuid4()),
            )
            headers = {
                h.CORRELATION_ID: request.correlation_id,
                h.SCHEMA: schema_of(RequestInference),
                **routing_headers(request),
            }
            await producer.send(
                topics.INFERENCE_REQUESTS,
                to_wire(request),
                key=request.patient_pseudonym.encode(),
                headers=[(k, v.encode()) for k, v in headers.items()],
            )
            await asyncio.sleep(1 / rate_per_s)

    task = asyncio.create_task(send())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await producer.stop()
