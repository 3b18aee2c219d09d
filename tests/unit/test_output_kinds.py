"""Output kinds of model spec v2: each reads its tensors, fails loudly on bad values, and becomes
conformant FHIR (classification, findings, quantity, thresholded risk score)."""

from __future__ import annotations

from typing import Any

import pytest

from medmesh_contracts.modelspec import ModelSpec, load_spec, parse_spec
from medmesh_contracts.results import (
    ClassReading,
    FindingsReading,
    OutputError,
    QuantityReading,
    ScoreReading,
    read_outputs,
)
from medmesh_reporting.report import ReportBuildError, build_report
from tests.conformance.report_cases import ISSUED, ROOT
from tests.conformance.report_checks import check_report_bundle
from tests.factories import (
    MODEL_OUTPUT,
    PANEL_ALL_OUTPUTS,
    PANEL_VALUES,
    make_completed,
    make_request,
    make_task,
    panel_model,
)

# The fictional panel model no service names (tests.factories.panel_model), one version with a
# classification, findings, a quantity and an explanation (its tensors are declared, never served).
THIRD_MODEL = panel_model({1: PANEL_ALL_OUTPUTS})
OUTPUTS = PANEL_VALUES


@pytest.fixture(scope="module")
def third() -> ModelSpec:
    """The fictional third model's spec."""
    return parse_spec(THIRD_MODEL)


def _report(spec: ModelSpec, outputs: dict[str, tuple[float, ...]]) -> dict[str, Any]:
    request = make_request(model=spec.name)
    return build_report(make_completed(make_task(request), outputs=outputs), spec, issued=ISSUED)


def test_each_kind_reads_its_tensor(third: ModelSpec) -> None:
    """The headline is the most probable class; findings at or above threshold; the quantity."""
    reading = read_outputs(third, third.version(1), OUTPUTS)
    headline, findings, quantity = reading.readings
    assert isinstance(headline, ClassReading)
    assert (headline.label, headline.top) == ("stressed", 1)
    assert isinstance(findings, FindingsReading)
    assert [f.code.code for f, _ in findings.present] == ["3424008"]
    assert isinstance(quantity, QuantityReading)
    assert quantity.value == 97.25
    assert reading.explanation is not None
    assert [i.name for i in reading.explanation.items] == ["heart_rate", "respiratory_rate"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"RATE": (float("nan"),)}, "RATE holds a value that is not a finite number"),
        ({"CLASS_P": (0.5, 0.5)}, "CLASS_P has 2 values a row, the spec declares 3"),
        ({"FINDINGS_P": (1.7, 0.1)}, "FINDINGS_P holds a probability outside 0-1"),
        ({"WHY": ()}, "WHY has 0 values a row"),
    ],
    ids=["nan", "shape", "probability", "empty"],
)
def test_outputs_that_do_not_fit_are_an_output_error(
    third: ModelSpec, change: dict[str, tuple[float, ...]], message: str
) -> None:
    """NaN, a wrong width or a probability outside 0-1 is refused, naming the tensor."""
    with pytest.raises(OutputError, match=message):
        read_outputs(third, third.version(1), OUTPUTS | change)
    with pytest.raises(ReportBuildError, match=message):
        _report(third, OUTPUTS | change)


def test_a_third_model_reports_every_kind_conformantly(third: ModelSpec) -> None:
    """Classification, finding and quantity Observations; the class is the conclusion code."""
    bundle = _report(third, OUTPUTS)
    assert check_report_bundle(bundle) == []
    by_type: dict[str, list[dict[str, Any]]] = {}
    for entry in bundle["entry"]:
        by_type.setdefault(entry["resource"]["resourceType"], []).append(entry["resource"])
    (report,) = by_type["DiagnosticReport"]
    state, finding, rate = by_type["Observation"]
    assert [r["reference"] for r in report["result"]] == [
        f"urn:uuid:{o['id']}" for o in (state, finding, rate)
    ]
    assert report["conclusionCode"] == [
        {
            "coding": [{"system": MODEL_OUTPUT, "code": "stressed", "display": "Stressed"}],
            "text": "Stressed",
        }
    ]
    assert report["conclusion"].startswith("Stressed (probability 85.0 %)")
    assert state["valueCodeableConcept"]["coding"][0]["code"] == "stressed"
    assert state["interpretation"][0]["coding"][0]["code"] == "A"
    probabilities = [c["valueQuantity"]["value"] for c in state["component"][:3]]
    assert probabilities == [10.0, 85.0, 5.0]
    assert [c["valueQuantity"]["value"] for c in state["component"][3:]] == [0.7, -0.1]
    assert finding["code"]["coding"][0]["code"] == "3424008"
    assert finding["valueQuantity"] == {
        "value": 93.0,
        "unit": "%",
        "system": "http://unitsofmeasure.org",
        "code": "%",
    }
    assert rate["valueQuantity"]["value"] == 97.25
    assert rate["valueQuantity"]["code"] == "/min"
    identifiers = {o["identifier"][0]["value"] for o in by_type["Observation"]}
    assert len(identifiers) == 3
    provenance = by_type["Provenance"][0]
    assert len(provenance["target"]) == 4


def test_no_finding_above_threshold_is_reported_as_a_negative_result() -> None:
    """Labels all below threshold: one 'no finding' Observation with every label's probability,
    no conclusion code, conformant."""
    document = dict(THIRD_MODEL)
    version = dict(document["versions"][0])
    version["outputs"] = [version["outputs"][1]]
    version["triton"] = dict(version["triton"]) | {
        "outputs": [{"name": "FINDINGS_P", "shape": [2]}]
    }
    spec = parse_spec(document | {"versions": [version]})
    bundle = _report(spec, {"FINDINGS_P": (0.1, 0.2)})
    assert check_report_bundle(bundle) == []
    report, observation = (e["resource"] for e in bundle["entry"][:2])
    assert len(report["result"]) == 1
    assert "conclusionCode" not in report
    assert report["conclusion"].startswith("No finding reached its threshold")
    assert observation["valueCodeableConcept"]["coding"][0]["code"] == "no-finding"
    assert [c["valueQuantity"]["value"] for c in observation["component"]] == [10.0, 20.0]


def test_thresholded_risk_score_reads_its_band_from_the_score() -> None:
    """deterioration v3 (ONNX): 23.4 % from column 1 of PROBABILITIES is the medium band."""
    spec = load_spec(ROOT / "deploy" / "models" / "deterioration.yaml")
    headline = read_outputs(spec, spec.version(3), {"PROBABILITIES": (0.766, 0.234)}).headline
    assert isinstance(headline, ScoreReading)
    assert abs(float(headline.score) - 23.4) < 1e-9
    assert headline.band.code == "medium"
    bundle = build_report(make_completed(make_task(model_version=3)), spec, issued=ISSUED)
    assert check_report_bundle(bundle) == []


def test_spec_refuses_outputs_that_do_not_fit_their_tensors() -> None:
    """A classification naming 3 classes over a 2-value tensor is refused at load."""
    document = dict(THIRD_MODEL)
    version = dict(document["versions"][0])
    triton = dict(version["triton"])
    triton["outputs"] = [{"name": "CLASS_P", "shape": [2]}, *triton["outputs"][1:]]
    version["triton"] = triton
    with pytest.raises(ValueError, match="classification output names 3 values"):
        parse_spec(document | {"versions": [version]})
