"""Dead-letter topics: what they hold and how an entry goes back to where it came from.

Pure functions over decoded records; the Kafka I/O lives in the CLI command.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any

from medmesh_contracts import topics

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

# Dead-letter topics `medmesh dlq replay` refuses, and why (with what to do instead).
#
# An undeliverable report is already on medmesh.reports.diagnostic: the only topic it could go
# back to. Sent there again, it would be a second report (every reader of reports would take it
# twice; the FHIR server's conditional creates hide the duplicate from the server only). A safe
# replay asks reporting to deliver that one report again through a delivery-request topic, which
# reporting does not read yet (issue 20 item 6).
NOT_REPLAYABLE: dict[str, str] = {
    topics.REPORTS_UNDELIVERABLE: (
        f"{topics.REPORTS_UNDELIVERABLE} is not replayed: each of its reports is already on"
        f" {topics.REPORTS_DIAGNOSTIC}, and sending it back there would publish the report a"
        " second time (a duplicate for every reader of reports). Redelivering one report needs a"
        " delivery-request topic that reporting does not read yet. Instead: fix the cause"
        f" (`medmesh dlq show {topics.REPORTS_UNDELIVERABLE}`), then move reporting's delivery"
        " group (MEDMESH_DELIVERY_GROUP_ID, default medmesh-reporting-delivery) back to the"
        f" report's offset on {topics.REPORTS_DIAGNOSTIC}: delivery is idempotent (conditional"
        " creates), so the reports delivered since are not written twice (docs/deployment.md,"
        " 'Undeliverable reports')."
    ),
}


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
    if "report" in event and "fhir_server" in event:  # ReportUndeliverable
        raise ValueError(NOT_REPLAYABLE[topics.REPORTS_UNDELIVERABLE])
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
