"""OperationOutcome building: how ingest tells a sender what it did with a payload (R4B JSON).

Diagnostics name FHIRPath locations and rule names, never values taken from the payload: a
payload carries patient data (names, identifiers, birth dates, addresses, phone numbers) and an
OperationOutcome ends up in HTTP responses, on the rejected-events topic and in logs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Literal

Severity = Literal["fatal", "error", "warning", "information"]

# HTTP status of a rejection, by cause.
NOT_FHIR = int(HTTPStatus.BAD_REQUEST)  # not JSON, not a FHIR resource, wrong resource type
INVALID_FHIR = int(HTTPStatus.UNPROCESSABLE_ENTITY)  # FHIR, but invalid or unusable content
UNSUPPORTED_VERSION = int(HTTPStatus.UNSUPPORTED_MEDIA_TYPE)  # a FHIR version we do not speak
TOO_LARGE = int(HTTPStatus.REQUEST_ENTITY_TOO_LARGE)  # over the size, nesting or entry limits


@dataclass(frozen=True)
class Issue:
    """One OperationOutcome.issue.

    ``code`` is a FHIR issue-type code (``structure``, ``required``, ``value``, ``invalid``,
    ``not-supported``, ``informational``, ``incomplete``...); ``expression`` holds FHIRPath
    locations in the payload.
    """

    severity: Severity
    code: str
    diagnostics: str
    expression: tuple[str, ...] = ()

    def to_fhir(self) -> dict[str, Any]:
        """The issue as R4B JSON."""
        issue: dict[str, Any] = {
            "severity": self.severity,
            "code": self.code,
            "diagnostics": self.diagnostics,
        }
        if self.expression:
            issue["expression"] = list(self.expression)
        return issue

    @property
    def is_error(self) -> bool:
        """Whether the issue makes the payload unusable (``fatal`` or ``error``)."""
        return self.severity in ("fatal", "error")


def outcome(issues: Sequence[Issue]) -> dict[str, Any]:
    """An OperationOutcome (R4B JSON) holding the issues; ``issue`` is 1..*, so none says 'OK'."""
    if not issues:
        issues = [Issue("information", "informational", "No issues.")]
    return {"resourceType": "OperationOutcome", "issue": [i.to_fhir() for i in issues]}


class FhirRejected(Exception):  # noqa: N818 -- the name says what happened to the payload
    """A payload ingest will not process; ``status`` is the HTTP status, ``outcome`` says why."""

    def __init__(self, status: int, outcome: dict[str, Any]) -> None:
        self.status = status
        self.outcome = outcome
        diagnostics = [str(i.get("diagnostics", "")) for i in outcome.get("issue", ())]
        super().__init__(f"{status}: {'; '.join(diagnostics)}")


def rejection(status: int, issues: Sequence[Issue]) -> FhirRejected:
    """A rejection whose OperationOutcome holds the issues."""
    return FhirRejected(status, outcome(issues))


def rejected(
    status: int, code: str, diagnostics: str, expression: Sequence[str] = ()
) -> FhirRejected:
    """A rejection with one error issue."""
    return rejection(status, [Issue("error", code, diagnostics, tuple(expression))])


def too_large_outcome() -> dict[str, Any]:
    """The answer to a payload over the body size limit (413)."""
    return outcome((Issue("error", "too-costly", "payload exceeds the size limit"),))
