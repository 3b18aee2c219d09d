"""What ingest decides for one FHIR payload: plain functions, no I/O.

The HTTP endpoint and the inbound-topic subscriber both call ``decide``; they differ only in how
they deliver the answer (an HTTP status with an OperationOutcome, or a dead-letter event).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from medmesh_contracts.events import (
    Producer,
    RequestInference,
    SourceContext,
    new_id,
)
from medmesh_contracts.modelspec import ModelSpec
from medmesh_ingest.extraction import Extraction, PatientInputs, extract
from medmesh_ingest.outcomes import FhirRejected, Issue, outcome
from medmesh_ingest.validation import parse_payload


@dataclass(frozen=True)
class IngestDecision:
    """The outcome of one payload: requests to publish, and the answer to give the sender."""

    requests: tuple[RequestInference, ...]
    status: int
    operation_outcome: dict[str, Any]
    # Issues found while extracting (units, missing inputs), for the answer and for logs.
    issues: tuple[Issue, ...] = field(default=())

    @property
    def rejected(self) -> bool:
        """True when the payload was not acceptable FHIR (a 4xx answer)."""
        return self.status >= 400


def decide(
    raw: bytes,
    *,
    specs: Mapping[str, ModelSpec],
    pseudonymize: Callable[[str], str],
    producer: Producer,
    source: SourceContext,
    received_at: datetime,
    resource_type_hint: str | None = None,
) -> IngestDecision:
    """Validate a payload, extract model inputs, and build one RequestInference per patient and model."""
    try:
        resources = parse_payload(raw, resource_type_hint)
    except FhirRejected as rejected:
        return IngestDecision((), rejected.status, rejected.outcome)
    extraction = extract(resources, specs, received_at=received_at)
    requests = tuple(
        _request(candidate, pseudonymize, producer, source, received_at)
        for candidate in extraction.complete
    )
    issues = (*extraction.issues, *_missing_issues(extraction))
    if requests:
        accepted = Issue(
            "information",
            "informational",
            "accepted: " + ", ".join(f"{r.model} request {r.correlation_id}" for r in requests),
        )
        return IngestDecision(requests, 202, outcome((accepted, *issues)), issues)
    if not issues:
        issues = (
            Issue(
                "warning",
                "not-found",
                "no resource in the payload matches the inputs of any deployed model; "
                "nothing was sent for inference",
            ),
        )
    return IngestDecision((), 200, outcome(issues), issues)


def _missing_issues(extraction: Extraction) -> tuple[Issue, ...]:
    # Names inputs and models only: the patient reference is patient data and stays out.
    return tuple(
        Issue(
            "warning",
            "incomplete",
            f"model {m.model}: required inputs missing: {', '.join(m.missing)}; "
            "nothing was sent for inference for this patient",
        )
        for m in extraction.incomplete
    )


def _request(
    candidate: PatientInputs,
    pseudonymize: Callable[[str], str],
    producer: Producer,
    source: SourceContext,
    received_at: datetime,
) -> RequestInference:
    return RequestInference(
        correlation_id=new_id(),
        producer=producer,
        model=candidate.model,
        patient_pseudonym=pseudonymize(candidate.subject_reference),
        subject_reference=candidate.subject_reference,
        encounter_reference=candidate.encounter_reference,
        inputs=candidate.inputs,
        effective_at=candidate.effective_at,
        received_at=received_at,
        source=source,
    )
