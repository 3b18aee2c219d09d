"""Observation.interpretation carries a v3 ObservationInterpretation coding wherever the result
maps to one honestly: a band's or class's code, POS for a finding, NEG for none."""

from __future__ import annotations

from typing import Any

from medmesh_reporting.report import V3_INTERPRETATION
from tests.conformance.report_cases import report_cases


def _observations() -> list[tuple[str, dict[str, Any]]]:
    return [
        (name, entry["resource"])
        for name, case in sorted(report_cases().items())
        for entry in case.build()["entry"]
        if entry["resource"]["resourceType"] == "Observation"
    ]


def _v3_codes(observation: dict[str, Any]) -> list[str]:
    return [
        coding["code"]
        for concept in observation.get("interpretation", ())
        for coding in concept["coding"]
        if coding["system"] == V3_INTERPRETATION
    ]


def test_every_interpretation_has_a_v3_coding_first() -> None:
    """Each interpretation of every kind of report starts with a v3 ObservationInterpretation
    coding (the band's own coding, if any, follows it)."""
    interpreted = [(n, o) for n, o in _observations() if "interpretation" in o]
    assert interpreted
    for name, observation in interpreted:
        for concept in observation["interpretation"]:
            assert concept["coding"][0]["system"] == V3_INTERPRETATION, name


def test_no_finding_is_interpreted_negative() -> None:
    """The no-finding Observation (no label reached its threshold) is interpreted v3 NEG."""
    negatives = [
        o
        for _, o in _observations()
        if o.get("valueCodeableConcept", {}).get("coding", [{}])[0].get("code") == "no-finding"
    ]
    assert negatives
    assert all(_v3_codes(o) == ["NEG"] for o in negatives)
    assert all(o["interpretation"][0]["coding"][0]["display"] == "Negative" for o in negatives)
