"""Where medmesh creates its topics, the audit topic keeps every rollout decision for good."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import yaml

from medmesh_cli.devstack import topics as devstack_topics
from medmesh_cli.devstack.topics import create_topics
from medmesh_contracts import topics

ROOT = Path(__file__).resolve().parents[2]


def test_the_audit_topic_is_created_with_unlimited_retention() -> None:
    """The contract's medmesh.models.audit entry has retention.ms=-1 and one partition."""
    contract = {s.name: s for s in topics.all_topics([("deterioration", 1)])}
    audit = contract[topics.MODELS_AUDIT]
    assert audit.config == {"retention.ms": "-1"}
    assert audit.partitions == 1
    assert "retention.ms" not in contract[topics.INFERENCE_REQUESTS].config


def test_create_topics_passes_the_audit_retention_to_kafka(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The dev stack's (and compose's and the small overlay's) create_topics asks Kafka for an
    audit topic with retention.ms=-1."""
    created: list[Any] = []

    class Admin:
        def __init__(self, **_kwargs: Any) -> None:
            pass

        async def start(self) -> None:
            pass

        async def close(self) -> None:
            pass

        async def list_topics(self) -> list[str]:
            return []

        async def create_topics(self, new: list[Any]) -> None:
            created.extend(new)

    monkeypatch.setattr(devstack_topics, "AIOKafkaAdminClient", Admin)
    asyncio.run(create_topics("127.0.0.1:1", topics.all_topics([])))
    audit = next(t for t in created if t.name == topics.MODELS_AUDIT)
    assert audit.topic_configs == {"retention.ms": "-1"}


def test_the_large_overlay_keeps_the_audit_topic_for_good() -> None:
    """The large overlay's KafkaTopic for medmesh.models.audit has retention.ms "-1"."""
    manifests = yaml.safe_load_all(
        (ROOT / "deploy" / "k8s" / "overlays" / "large" / "kafka-topics.yaml").read_text()
    )
    audit = next(m for m in manifests if m["spec"]["topicName"] == topics.MODELS_AUDIT)
    assert audit["spec"]["config"]["retention.ms"] == "-1"


@pytest.mark.parametrize("path", ["compose.yaml", "deploy/k8s/overlays/small/topics-job.yaml"])
def test_the_topics_jobs_create_topics_through_create_topics(path: str) -> None:
    """Compose's and the small overlay's topics jobs go through create_topics, so they create
    the audit topic with its retention too."""
    text = (ROOT / path).read_text()
    assert "from medmesh_cli.devstack.topics import create_topics" in text
    assert "asyncio.run(create_topics(" in text
