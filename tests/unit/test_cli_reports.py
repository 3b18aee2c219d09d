"""How the CLI shows a report's score to people: sensible precision and a human unit."""

from __future__ import annotations

import pytest

from medmesh_cli.reports import ReportSummary, format_score
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
