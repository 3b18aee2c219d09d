"""The demo's one-line printout of ingest's answer (``medmesh up --demo``)."""

from __future__ import annotations

from typing import Any

from medmesh_cli.main import answer_summary


def _entry(status: str, diagnostics: str | None = None) -> dict[str, Any]:
    response: dict[str, Any] = {"status": status}
    if diagnostics is not None:
        response["outcome"] = {
            "resourceType": "OperationOutcome",
            "issue": [
                {"severity": "information", "code": "informational", "diagnostics": diagnostics}
            ],
        }
    return {"response": response}


def test_an_operation_outcome_is_summed_up_by_its_diagnostics() -> None:
    """A 202's OperationOutcome prints its diagnostics, joined."""
    outcome = {
        "resourceType": "OperationOutcome",
        "issue": [{"diagnostics": "accepted: deterioration request c1"}, {"diagnostics": "late"}],
    }
    assert answer_summary(outcome) == "accepted: deterioration request c1; late"


def test_a_batch_response_prints_its_statuses_and_each_outcome_once() -> None:
    """A batch-response prints its type, how many entries got each status, and the entries'
    diagnostics without repeats (every Observation names the same request)."""
    sent = "sent for inference: deterioration request c1"
    body = {
        "resourceType": "Bundle",
        "type": "batch-response",
        "entry": [_entry("200 OK"), _entry("202 Accepted", sent), _entry("202 Accepted", sent)],
    }
    assert answer_summary(body) == f"batch-response: 1x 200 OK, 2x 202 Accepted; {sent}"
