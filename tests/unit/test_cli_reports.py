"""How the CLI shows a report's score to people: sensible precision and a human unit."""

from __future__ import annotations

import json
from typing import Any

import pytest

from medmesh_cli.reports import V3_INTERPRETATION, ReportSummary, format_score, summarize
from medmesh_contracts.formatting import format_number, human_unit


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (0.3495475649833679, "0.35"),
        (12.345, "12.3"),
        (97.999, "98"),
        (0.00123456, "0.00123"),
        (1234.56, "1235"),
        (0.0, "0"),
        (5, "5"),
    ],
)
def test_scores_keep_three_significant_digits_without_noise(value: float, shown: str) -> None:
    """A fraction is rounded to 3 significant digits, no trailing zeros, no exponent."""
    assert format_number(value) == shown


@pytest.mark.parametrize(
    ("ucum", "human"),
    [("{score}", "points"), ("{beats}", "beats"), ("%", "%"), ("Cel", "°C"), ("1", "")],
)
def test_ucum_annotations_become_words(ucum: str, human: str) -> None:
    """UCUM annotations ({score}) and codes (Cel, 1) are shown as people write units."""
    assert human_unit(ucum) == human


def test_a_report_summary_prints_its_score_for_people() -> None:
    """The demo's score column reads `0.35 %` and `5 points`, and `-` without a score."""

    def summary(score: float | int | None, unit: str) -> ReportSummary:
        return ReportSummary("c", "p", "deterioration", "2", score, unit, "low", None)

    assert summary(0.3495475649833679, "%").score_text == "0.35 %"
    assert summary(5, "{score}").score_text == "5 points"
    assert summary(None, "").score_text == "-"
    assert format_score(0.5, "1") == "0.5"


@pytest.mark.parametrize(
    ("score", "unit", "shown"),
    [
        (0.3495475649833679, "%", "0.35 %"),
        (7, "{score}", "7 points"),
        (1, "{score}", "1 point"),
        (0.0123, "1", "0.0123"),
        (None, "", "-"),
    ],
)
def test_a_score_reads_with_three_digits_and_a_unit_for_people(
    score: float | int | None, unit: str, shown: str
) -> None:
    """A percentage keeps 3 significant digits (it is already in percent: 0.35 %, not 35 %), an
    integer score is shown as is in points (one point), a dimensionless number bare."""
    assert format_score(score, unit) == shown


def _bundle(observation: dict[str, Any]) -> bytes:
    device = {
        "resourceType": "Device",
        "deviceName": [{"name": "chest-opacity", "type": "model-name"}],
        "version": [{"value": "1"}],
    }
    resources = [{"resourceType": "Observation", **observation}, device]
    return json.dumps({"entry": [{"resource": r} for r in resources]}).encode()


POS = {"system": V3_INTERPRETATION, "code": "POS"}
OPACITY = {"system": "https://medmesh.dev/fhir/CodeSystem/model-output", "code": "opacity"}


def test_a_finding_present_shows_its_code_and_probability() -> None:
    """A findings report has no band: its row shows the finding found and its probability."""
    summary = summarize(
        b"p1",
        _bundle(
            {
                "code": {"coding": [OPACITY]},
                "valueQuantity": {"value": 96.1234, "code": "%"},
                "interpretation": [{"coding": [POS]}],
            }
        ),
        {},
    )
    assert (summary.band, summary.score_text) == ("opacity", "96.1 %")


def test_no_finding_or_a_class_shows_its_concept() -> None:
    """A valueCodeableConcept (no-finding, a class) is what the row shows, without a score."""
    summary = summarize(
        b"p1",
        _bundle(
            {
                "code": {"coding": [{"code": "findings"}]},
                "valueCodeableConcept": {"coding": [{"code": "no-finding"}]},
            }
        ),
        {},
    )
    assert (summary.band, summary.score_text) == ("no-finding", "-")


def test_a_plain_quantity_leaves_the_result_column_empty() -> None:
    """A plain quantity (not a finding) leaves the column empty rather than show its code."""
    summary = summarize(
        b"p1",
        _bundle({"code": {"coding": [OPACITY]}, "valueQuantity": {"value": 72.4, "code": "/min"}}),
        {},
    )
    assert (summary.band, summary.score_text) == ("", "72.4 /min")
