"""Create medmesh's topics from the contract (never by broker auto-creation), each with the
settings its contract entry gives (``medmesh_contracts.topics``: the audit topic kept for good)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaConnectionError, TopicAlreadyExistsError

from medmesh_contracts.topics import TopicSpec


async def create_topics(
    bootstrap: str,
    specs: list[TopicSpec],
    timeout_s: float = 60.0,
    *,
    security: Mapping[str, Any] | None = None,
) -> None:
    """Create every topic that does not exist yet; the broker may still be starting.

    ``security``: the admin client's TLS/SASL arguments (``medmesh_runtime.kafka.
    aiokafka_security``, as the ops commands' ``Connection.security`` gives them); none for
    PLAINTEXT."""
    admin = AIOKafkaAdminClient(
        bootstrap_servers=bootstrap, request_timeout_ms=15000, **(security or {})
    )
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        try:
            await admin.start()
            break
        except KafkaConnectionError:
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.5)
    try:
        existing = set(await admin.list_topics())
        wanted = [
            NewTopic(s.name, s.partitions, 1, topic_configs=s.config)
            for s in specs
            if s.name not in existing
        ]
        if wanted:
            # Another process may create them between list and create: the goal is met then.
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics(wanted)
    finally:
        await admin.close()
