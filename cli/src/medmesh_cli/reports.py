"""Reading report Bundles back from medmesh.reports.diagnostic, for the demo and for tests."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from medmesh_contracts import headers as h
from medmesh_contracts.formatting import format_number, human_unit

V3_INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"


# Units whose singular differs, for a score of exactly 1 (reporting's narrative does the same).
_SINGULAR = {"points": "point", "beats": "beat"}


def format_score(score: float | int | None, ucum_code: str) -> str:
    """A report's score for people: rounded, with a human unit (``-`` when there is none)."""
    if score is None:
        return "-"
    unit, shown = human_unit(ucum_code), format_number(score)
    if shown == "1":
        unit = _SINGULAR.get(unit, unit)
    return f"{shown} {unit}" if unit else shown


@dataclass(frozen=True)
class ReportSummary:
    """The facts of one report a person wants to see in a table row."""

    correlation_id: str
    patient_pseudonym: str
    model: str
    model_version: str
    score: float | int | None
    score_unit: str  # its UCUM code, as the report has it
    band: str  # the model's band; or what was found (a finding, a class, no-finding)
    trace_id: str | None

    @property
    def score_text(self) -> str:
        """The score as a person reads it (``0.35 %``, ``5 points``; ``-`` without one)."""
        return format_score(self.score, self.score_unit)


def _first(resources: list[dict[str, Any]], resource_type: str) -> dict[str, Any]:
    for resource in resources:
        if resource.get("resourceType") == resource_type:
            return resource
    raise ValueError(f"the report bundle has no {resource_type}")


def _finding(observation: dict[str, Any]) -> str:
    """What a report without a band found: the class or "no-finding" of a valueCodeableConcept,
    or the code of a finding present (interpretation POS); "" for neither (a quantity)."""
    concept = observation.get("valueCodeableConcept")
    if concept is not None:
        return next((c.get("code", "") for c in concept.get("coding", [])), "")
    positive = any(
        c.get("system") == V3_INTERPRETATION and c.get("code") == "POS"
        for i in observation.get("interpretation", [])
        for c in i.get("coding", [])
    )
    if positive:
        return next((c.get("code", "") for c in observation.get("code", {}).get("coding", [])), "")
    return ""


def summarize(key: bytes | None, value: bytes, headers: dict[str, str]) -> ReportSummary:
    """Summarize one report Bundle as published by reporting."""
    bundle = json.loads(value)
    resources = [entry["resource"] for entry in bundle.get("entry", [])]
    observation = _first(resources, "Observation")
    device = _first(resources, "Device")
    if "valueInteger" in observation:
        score: float | int | None = observation["valueInteger"]
        unit = "{score}"
    elif "dataAbsentReason" in observation:
        score, unit = None, ""  # no result (e.g. an unreadable ECG): the band says why
    else:
        quantity = observation.get("valueQuantity", {})
        score, unit = quantity.get("value"), quantity.get("code", "")
    band = next(
        (
            c.get("code", "")
            for i in observation.get("interpretation", [])
            for c in i.get("coding", [])
            # The model's own band coding, beside the v3 ObservationInterpretation one.
            if c.get("system") not in (None, V3_INTERPRETATION)
        ),
        "",
    )
    if not band:
        band = _finding(observation)
    names = device.get("deviceName", [])
    versions = device.get("version", [])
    traceparent = headers.get(h.TRACEPARENT)
    return ReportSummary(
        correlation_id=headers.get(h.CORRELATION_ID, ""),
        patient_pseudonym=(key or b"").decode(),
        model=names[0]["name"] if names else "",
        model_version=versions[0]["value"] if versions else "",
        score=score,
        score_unit=unit,
        band=band,
        trace_id=traceparent.split("-")[1] if traceparent else None,
    )
