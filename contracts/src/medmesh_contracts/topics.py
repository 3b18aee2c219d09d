"""Every Kafka topic medmesh uses, with the settings it is created with.

Topic names are part of the wire contract: services, deployment files and tests import them from
here and never spell them out themselves.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

FHIR_INBOUND = "medmesh.fhir.inbound"
FHIR_INVALID = "medmesh.fhir.invalid"
INFERENCE_REQUESTS = "medmesh.inference.requests"
INFERENCE_RESULTS = "medmesh.inference.results"
INFERENCE_FAILED = "medmesh.inference.failed"
REPORTS_DIAGNOSTIC = "medmesh.reports.diagnostic"
ROUTER_DEADLETTER = "medmesh.deadletter.router"
INFERENCE_DEADLETTER = "medmesh.deadletter.inference"
REPORTING_DEADLETTER = "medmesh.deadletter.reporting"
# Model lifecycle: deployments (compacted, key = model name), decisions, worker heartbeats.
MODELS_REGISTRY = "medmesh.models.registry"
MODELS_AUDIT = "medmesh.models.audit"
MODELS_STATUS = "medmesh.models.status"
# Results of shadow versions: measured against stable, never turned into reports.
INFERENCE_SHADOW_RESULTS = "medmesh.inference.shadow-results"
# Reports a FHIR server refused or that could not be delivered, with the server's answer.
REPORTS_UNDELIVERABLE = "medmesh.reports.undeliverable"
# DeliverReport commands: reports to deliver to the FHIR server again (never published as reports
# a second time), e.g. `medmesh dlq replay medmesh.reports.undeliverable` after a fix.
REPORTS_DELIVERY_REQUESTS = "medmesh.reports.delivery-requests"
# Ingest's per-patient latest readings (compacted, key = pseudonym + model), rebuilt on start;
# states not updated within READINGS_RETENTION_HOURS are deleted.
INGEST_READINGS = "medmesh.ingest.readings"
# Ingest's highest handled event number per source and Subscription (compacted, key = source +
# subscription), read back on start to find missed notifications across restarts.
INGEST_SUBSCRIPTIONS = "medmesh.ingest.subscriptions"

_MODEL_NAME = re.compile(r"^[a-z][a-z0-9-]{0,62}$")


def model_task_topic(model: str, version: int) -> str:
    """The topic a model version's workers consume: one topic per deployed version."""
    if not _MODEL_NAME.fullmatch(model):
        raise ValueError(f"model name {model!r} must match {_MODEL_NAME.pattern}")
    if version < 1:
        raise ValueError(f"model version must be >= 1, got {version}")
    return f"medmesh.model.{model}.v{version}.tasks"


@dataclass(frozen=True)
class TopicSpec:
    """How a topic is created: medmesh never relies on broker auto-creation."""

    name: str
    partitions: int = 3
    config: dict[str, str] = field(default_factory=dict)
    # The schema ids of the records it carries (the medmesh-schema header; docs/asyncapi.yaml).
    carries: tuple[str, ...] = ()


# Dead-letter and failure topics keep two weeks so ops can inspect and replay them.
_KEEP_TWO_WEEKS = {"retention.ms": str(14 * 24 * 3600 * 1000)}

# Compacted topics keep the latest value per key forever: they are state, not history.
_COMPACTED = {"cleanup.policy": "compact", "min.compaction.lag.ms": "0"}
# Ingest's readings state: compacted per patient and model, and a state not updated for a week
# deleted (ingest forgets it then too: MEDMESH_READINGS_RETENTION_HOURS), so the topic and
# ingest's memory follow the patients seen lately, not every patient ever seen. A topic created
# before this config keeps its own until altered; ingest still forgets after each rebuild.
READINGS_RETENTION_HOURS = 7 * 24
_READINGS_STATE = {
    "cleanup.policy": "compact,delete",
    "min.compaction.lag.ms": "0",
    "retention.ms": str(READINGS_RETENTION_HOURS * 3600 * 1000),
}
# Heartbeats: compacted per worker instance, and old ones deleted after a day.
_HEARTBEATS = {"cleanup.policy": "compact,delete", "retention.ms": str(24 * 3600 * 1000)}
# The audit topic is the only record of every rollout decision (who, when, why, on which
# figures): kept for good, not for the broker's default 7 days. Wherever medmesh creates its
# topics (the dev stack and the topics jobs through create_topics, the large overlay's
# KafkaTopics from deploy/k8s/generate.py) it reads this; a topic created before keeps its
# settings until altered (docs/deployment.md, "Operating a deployment").
_KEEP_FOR_GOOD = {"retention.ms": "-1"}

# Schema ids of payloads that are FHIR JSON rather than medmesh events (headers.FHIR_*).
_FHIR = ("fhir.R4+json", "fhir.R4B+json", "fhir.R5+json")
_DEAD_LETTER = ("medmesh.MessageDeadLettered/1",)

STATIC_TOPICS: tuple[TopicSpec, ...] = (
    TopicSpec(FHIR_INBOUND, carries=_FHIR),
    TopicSpec(FHIR_INVALID, config=_KEEP_TWO_WEEKS, carries=("medmesh.FhirEventRejected/1",)),
    TopicSpec(INFERENCE_REQUESTS, carries=("medmesh.RequestInference/1",)),
    TopicSpec(INFERENCE_RESULTS, carries=("medmesh.InferenceCompleted/1",)),
    TopicSpec(INFERENCE_FAILED, config=_KEEP_TWO_WEEKS, carries=("medmesh.InferenceFailed/1",)),
    TopicSpec(REPORTS_DIAGNOSTIC, carries=_FHIR),
    TopicSpec(ROUTER_DEADLETTER, config=_KEEP_TWO_WEEKS, carries=_DEAD_LETTER),
    TopicSpec(INFERENCE_DEADLETTER, config=_KEEP_TWO_WEEKS, carries=_DEAD_LETTER),
    TopicSpec(REPORTING_DEADLETTER, config=_KEEP_TWO_WEEKS, carries=_DEAD_LETTER),
    TopicSpec(
        MODELS_REGISTRY, partitions=1, config=_COMPACTED, carries=("medmesh.ModelDeployment/1",)
    ),
    TopicSpec(
        MODELS_AUDIT, partitions=1, config=_KEEP_FOR_GOOD, carries=("medmesh.LifecycleDecision/1",)
    ),
    TopicSpec(
        MODELS_STATUS, partitions=1, config=_HEARTBEATS, carries=("medmesh.WorkerHeartbeat/1",)
    ),
    TopicSpec(INFERENCE_SHADOW_RESULTS, carries=("medmesh.InferenceCompleted/1",)),
    TopicSpec(
        REPORTS_UNDELIVERABLE, config=_KEEP_TWO_WEEKS, carries=("medmesh.ReportUndeliverable/1",)
    ),
    TopicSpec(
        REPORTS_DELIVERY_REQUESTS, config=_KEEP_TWO_WEEKS, carries=("medmesh.DeliverReport/1",)
    ),
    TopicSpec(
        INGEST_READINGS, config=_READINGS_STATE, carries=("medmesh.PatientReadingsUpdated/1",)
    ),
    TopicSpec(
        INGEST_SUBSCRIPTIONS,
        partitions=1,
        config=_COMPACTED,
        carries=("medmesh.SubscriptionEventsHandled/1",),
    ),
)


def all_topics(
    model_versions: list[tuple[str, int]], partitions: int | None = None
) -> list[TopicSpec]:
    """Every topic the pipeline needs for the given deployed model versions."""
    specs = [*STATIC_TOPICS, *(task_topic_spec(m, v) for m, v in model_versions)]
    if partitions is None:
        return specs
    # Single-partition topics (registry, audit, status) stay single: their order is their meaning.
    return [
        TopicSpec(s.name, partitions if s.partitions > 1 else 1, dict(s.config), s.carries)
        for s in specs
    ]


def task_topic_spec(model: str, version: int, partitions: int = 3) -> TopicSpec:
    """The task topic of one deployed model version (RunInference commands)."""
    return TopicSpec(
        model_task_topic(model, version), partitions, carries=("medmesh.RunInference/1",)
    )
