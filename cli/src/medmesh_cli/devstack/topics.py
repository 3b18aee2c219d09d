"""Create medmesh's topics from the contract (never by broker auto-creation)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaConnectionError, TopicAlreadyExistsError

from medmesh_contracts.topics import MODELS_AUDIT, TopicSpec

# Topic settings added to the contract's (medmesh_contracts.topics) wherever medmesh creates its
# topics: the dev stack, compose's and the small overlay's topics jobs (create_topics), and the
# large overlay's KafkaTopics (deploy/k8s/generate.py). The audit topic is the only record of
# every rollout decision (who, when, why, on which figures): kept for good (retention.ms=-1), not
# for the broker's default 7 days. A topic created before keeps its settings until altered
# (docs/deployment.md, "Operating a deployment").
TOPIC_CONFIG: dict[str, dict[str, str]] = {MODELS_AUDIT: {"retention.ms": "-1"}}


def with_topic_config(specs: list[TopicSpec]) -> list[TopicSpec]:
    """The specs with ``TOPIC_CONFIG`` added to their config (new objects; the contract's are
    left as they are)."""
    return [
        TopicSpec(s.name, s.partitions, {**s.config, **TOPIC_CONFIG[s.name]})
        if s.name in TOPIC_CONFIG
        else s
        for s in specs
    ]


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
            for s in with_topic_config(specs)
            if s.name not in existing
        ]
        if wanted:
            # Another process may create them between list and create: the goal is met then.
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics(wanted)
    finally:
        await admin.close()
