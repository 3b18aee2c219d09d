"""The answer to a batch or transaction Bundle posted over HTTP: a ``batch-response`` or
``transaction-response`` Bundle with one entry per entry of the request, in the same order,
each with ``response.status`` and, where there is something to say, ``response.outcome`` (FHIR
R4B and R5 http.html, "Batch/Transaction response"; the JSON is the same in both versions).

Per entry:

- ``202 Accepted``: an inference request this payload sent (committed to Kafka) took an input
  from the entry's resource, or answers it (an order); the outcome names the request(s) by
  model and correlation id. An entry whose resource has neither an id nor a fullUrl cannot be
  named by a request: it counts as used when its patient's request has an unnamed input.
- ``200 OK``: accepted, and nothing of it was sent now (its readings were kept until the
  patient's set is complete, were already sent, were superseded by later ones, or are no model's
  input; a Patient or Encounter entry is read only as a reference target).
- ``4xx``: a batch entry set aside, with the status it would have got alone (422 invalid, 413
  over a limit) and an OperationOutcome saying why. A transaction never gets here: any invalid
  entry rejects it as a whole (a single OperationOutcome, nothing sent).

``response.location`` is never set: FHIR means by it where the created resource can be read
(the Location header of a create), and ingest stores no resource; an inference request is a
Kafka record, not a URL on this server. Its correlation id is in the entry's outcome and, for
the whole payload, in the ``medmesh-correlation-id`` header.

Outcomes follow ``outcomes.py``: diagnostics name FHIRPath locations in the request Bundle,
models, inputs and correlation ids, never patient data.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Literal

from medmesh_contracts.events import RequestInference
from medmesh_ingest.outcomes import Issue, outcome
from medmesh_ingest.validation import EntryFailure, ParsedResource, entry_of, issue_entry

# Resource types that can be a model's input or order: their entries always get an outcome.
_CLINICAL = frozenset({"Observation", "ServiceRequest", "ImagingStudy"})


@dataclass(frozen=True)
class BundleReply:
    """A batch or transaction Bundle to answer entry by entry: how many entries it has, the
    resources accepted (each knows its entry by its expression) and the entries set aside."""

    bundle_type: Literal["batch", "transaction"]
    entries: int
    resources: tuple[ParsedResource, ...]
    failed: tuple[EntryFailure, ...] = ()


def response_bundle(
    reply: BundleReply,
    issues: Sequence[Issue],
    patients: Mapping[str, Sequence[Issue]],
    requests: Sequence[RequestInference],
) -> dict[str, Any]:
    """The batch-response or transaction-response Bundle (FHIR JSON, R4B and R5 alike).

    ``issues`` are those met reading the payload (each located in its entry), ``patients``
    what the merges said per patient (subject reference), ``requests`` the requests the payload
    sent.
    """
    by_entry = {entry_of(r.expression): r for r in reply.resources}
    failed = {f.index: f for f in reply.failed}
    located: dict[int, list[Issue]] = {}
    for issue in issues:
        index = issue_entry(issue)
        if index is not None:
            located.setdefault(index, []).append(issue)
    entries: list[dict[str, Any]] = []
    for index in range(reply.entries):
        if index in failed:
            entries.append(_response(failed[index].status, failed[index].issues))
            continue
        resource = by_entry.get(index)
        if resource is None:  # not expected: an entry without a resource is invalid
            entries.append(_response(int(HTTPStatus.OK), ()))
            continue
        entries.append(_accepted(resource, located.get(index, []), patients, requests))
    bundle: dict[str, Any] = {"resourceType": "Bundle", "type": f"{reply.bundle_type}-response"}
    if entries:
        bundle["entry"] = entries
    return bundle


def status_line(status: int) -> str:
    """An entry's ``response.status``: the HTTP code and its reason phrase (``202 Accepted``)."""
    return f"{status} {HTTPStatus(status).phrase}"


def _accepted(
    resource: ParsedResource,
    own: Sequence[Issue],
    patients: Mapping[str, Sequence[Issue]],
    requests: Sequence[RequestInference],
) -> dict[str, Any]:
    used = [r for r in requests if _uses(r, resource)]
    notes: list[Issue] = []
    if used:
        sent = ", ".join(f"{r.model} request {r.correlation_id}" for r in used)
        notes.append(Issue("information", "informational", f"sent for inference: {sent}"))
    notes.extend(own)
    clinical = resource.resource_type in _CLINICAL
    if clinical and resource.subject_reference is not None:
        notes.extend(patients.get(resource.subject_reference, ()))
    if clinical and not notes:
        notes.append(
            Issue("information", "informational", "nothing from this entry was sent for inference")
        )
    status = HTTPStatus.ACCEPTED if used else HTTPStatus.OK
    return _response(int(status), tuple(dict.fromkeys(notes)))


def _uses(request: RequestInference, resource: ParsedResource) -> bool:
    """Whether the request took an input from the resource or answers it (an order)."""
    reference = resource.reference
    if reference is not None:
        return request.based_on_reference == reference or any(
            i.source_reference == reference for i in request.inputs
        )
    return (
        resource.resource_type == "Observation"
        and resource.subject_reference == request.subject_reference
        and any(i.source_reference is None for i in request.inputs)
    )


def _response(status: int, issues: Sequence[Issue]) -> dict[str, Any]:
    response: dict[str, Any] = {"status": status_line(status)}
    if issues:
        response["outcome"] = outcome(issues)
    return {"response": response}
