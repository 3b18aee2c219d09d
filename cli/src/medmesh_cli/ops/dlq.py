"""Dead-letter topics: what they hold and how an entry goes back to where it came from.

Pure functions over decoded records; the Kafka I/O lives in the CLI command.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any

from medmesh_cli.models import PRODUCER
from medmesh_contracts import headers as h
from medmesh_contracts import topics
from medmesh_contracts.events import DeliverReport, new_id, schema_of, to_wire

# Every topic where medmesh parks what it could not process, and what each holds.
DEAD_LETTER_TOPICS: dict[str, str] = {
    topics.FHIR_INVALID: "inbound FHIR that ingest rejected (FhirEventRejected)",
    topics.INFERENCE_FAILED: "requests a worker could not score (InferenceFailed)",
    topics.ROUTER_DEADLETTER: "messages the router could not decode or route",
    topics.INFERENCE_DEADLETTER: "tasks a worker could not decode",
    topics.REPORTING_DEADLETTER: "results that could not become a valid report",
    topics.REPORTS_UNDELIVERABLE: "reports a FHIR server refused or never took",
}
REPLAY_HEADER = "medmesh-replay-of"

# An undeliverable report is already on medmesh.reports.diagnostic; sent back there it would be a
# second report for every reader of reports. Its replay is a DeliverReport command instead, which
# reporting's delivery reads from medmesh.reports.delivery-requests and delivers with the same
# conditional creates: the server keeps one copy, and no reader sees the report twice.


@dataclass(frozen=True)
class Replay:
    """Where a dead letter goes back to: topic, key, value and headers."""

    topic: str
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]]


def summary(event: dict[str, Any]) -> str:
    """One line saying why an entry is here, without patient data (no raw values)."""
    if "reason" in event:
        return str(event["reason"])[:300]
    outcome = event.get("operation_outcome") or {}
    issues = outcome.get("issue", [])
    return "; ".join(
        f"{i.get('severity', '?')}: {i.get('diagnostics', '')}"
        + (f" at {', '.join(i['expression'])}" if i.get("expression") else "")
        for i in issues
    )[:300]


def replay_of(event: dict[str, Any], key: bytes | None, origin: str) -> Replay:
    """The message that re-runs a dead-lettered entry from its source (after a fix).

    ValueError when the entry cannot be replayed safely or at all (the message says why)."""
    headers = [(REPLAY_HEADER, origin.encode())]
    if "report" in event and "fhir_server" in event:  # ReportUndeliverable: deliver it again
        command = DeliverReport(
            correlation_id=str(event.get("correlation_id") or new_id()),
            producer=PRODUCER,
            report=event["report"],
            replay_of=origin,
            fhir_version=event.get("fhir_version"),
        )
        headers += [
            (h.CORRELATION_ID, command.correlation_id.encode()),
            (h.SCHEMA, schema_of(DeliverReport).encode()),
        ]
        return Replay(topics.REPORTS_DELIVERY_REQUESTS, key, to_wire(command), headers)
    if event.get("raw_truncated"):
        raise ValueError(
            f"this dead letter keeps only the start of a {event.get('raw_size')}-byte record"
            f" (sha256 {event.get('raw_sha256')}): replay it from its source topic"
            f" {event.get('source_topic')}, offset {event.get('source_offset')}"
        )
    if "raw_value" in event and "source_topic" in event:
        raw = str(event["raw_value"])
        value = base64.b64decode(raw) if event.get("raw_encoding") == "base64" else raw.encode()
        return Replay(event["source_topic"], key, value, headers)
    if "task" in event:  # InferenceFailed: the task goes back to its version's topic
        task = event["task"]
        topic = topics.model_task_topic(task["request"]["model"], int(task["model_version"]))
        return Replay(topic, key, json.dumps(task).encode(), headers)
    raise ValueError("this entry carries nothing that can be replayed")
