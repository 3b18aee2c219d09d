"""The reporting service's pure report builder: InferenceCompleted + spec -> FHIR R4B Bundle."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from fhir.resources.bundle import Bundle as R5Bundle
from fhir.resources.R4B.device import Device as R4BDevice
from pydantic import ValidationError

from medmesh_contracts.events import SourceContext
from medmesh_contracts.headers import FHIR_R4B_JSON, FHIR_R5_JSON
from medmesh_contracts.modelspec import ModelSpec, RiskScoreOutput, load_spec
from medmesh_reporting.report import (
    AIAST,
    REPORT_IDENTIFIER_SYSTEM,
    ReportBuildError,
    build_report,
    report_ids,
    report_schema,
)
from tests.conformance.report_checks import check_report_bundle
from tests.factories import make_completed, make_request, make_task

ROOT = Path(__file__).resolve().parents[2]
ISSUED = datetime(2026, 11, 23, 8, 31, tzinfo=UTC)
V3_INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"


@pytest.fixture(scope="module")
def spec() -> ModelSpec:
    """The deterioration model's spec, as deployed."""
    return load_spec(ROOT / "deploy" / "models" / "deterioration.yaml")


def resources(bundle: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The Bundle's resources by resourceType (a report holds one of each)."""
    return {e["resource"]["resourceType"]: e["resource"] for e in bundle["entry"]}


def test_bundle_is_a_collection_of_report_observation_device_provenance(spec: ModelSpec) -> None:
    """The Bundle is a collection holding report, Observation, Device and Provenance in order."""
    bundle = build_report(make_completed(), spec, issued=ISSUED)

    assert bundle["type"] == "collection"
    assert bundle["timestamp"] == "2026-11-23T08:31:00Z"
    assert bundle["identifier"] == {
        "system": REPORT_IDENTIFIER_SYSTEM,
        "value": make_request().correlation_id,
    }
    kinds = [e["resource"]["resourceType"] for e in bundle["entry"]]
    assert kinds == ["DiagnosticReport", "Observation", "Device", "Provenance"]
    for entry in bundle["entry"]:
        assert entry["fullUrl"] == f"urn:uuid:{entry['resource']['id']}"


def test_v1_reports_integer_news2_with_band_interpretation(spec: ModelSpec) -> None:
    """Version 1 reports NEWS2 as valueInteger, interpreted with v3 and risk-band codings."""
    bundle = build_report(make_completed(), spec, issued=ISSUED)
    found = resources(bundle)
    report, observation = found["DiagnosticReport"], found["Observation"]

    assert observation["valueInteger"] == 7
    assert "valueQuantity" not in observation
    assert observation["code"]["coding"][0]["code"] == "1104051000000101"
    (interpretation,) = observation["interpretation"]
    assert interpretation["coding"][0] == {
        "system": V3_INTERPRETATION,
        "code": "HH",
        "display": "Critical high",
    }
    assert interpretation["coding"][1]["system"] == _risk_score(spec, 1).band_system
    assert interpretation["coding"][1]["code"] == "high"
    contributions = [c["valueQuantity"]["value"] for c in observation["component"]]
    assert contributions == [2.0, 1.0, 0.0, 1.0, 1.0, 2.0, 0.0]
    assert observation["component"][0]["code"]["coding"][0]["code"] == "9279-1"
    assert report["status"] == "final"
    assert report["result"] == [{"reference": f"urn:uuid:{observation['id']}"}]
    assert "7" in report["conclusion"]
    assert "High clinical risk" in report["conclusion"]
    assert "deterioration v1" in report["conclusion"]
    assert report["meta"]["security"] == [AIAST]
    assert observation["meta"]["security"] == [AIAST]


def test_v2_reports_percentage_as_value_quantity(spec: ModelSpec) -> None:
    """Version 2 reports its probability as a valueQuantity in UCUM '%'."""
    completed = make_completed(make_task(model_version=2))
    found = resources(build_report(completed, spec, issued=ISSUED))
    observation, device = found["Observation"], found["Device"]

    assert observation["valueQuantity"] == {
        "value": 23.4,
        "unit": "%",
        "system": "http://unitsofmeasure.org",
        "code": "%",
    }
    assert "valueInteger" not in observation
    assert observation["interpretation"][0]["coding"][0]["code"] == "H"
    assert "deterioration v2" in found["DiagnosticReport"]["conclusion"]
    assert device["version"][0]["value"] == "2"


def test_model_is_a_device_referenced_by_observation_and_provenance(spec: ModelSpec) -> None:
    """The AI model is a Device named by Observation.device and Provenance.agent.who."""
    bundle = build_report(make_completed(), spec, issued=ISSUED)
    found = resources(bundle)
    device_url = f"urn:uuid:{found['Device']['id']}"

    assert found["Observation"]["device"] == {"reference": device_url}
    assert found["Provenance"]["agent"][0]["who"]["reference"] == device_url
    assert found["Provenance"]["recorded"] == bundle["timestamp"]
    assert {t["reference"] for t in found["Provenance"]["target"]} == {
        f"urn:uuid:{found['DiagnosticReport']['id']}",
        f"urn:uuid:{found['Observation']['id']}",
    }
    assert "performer" not in found["DiagnosticReport"]


def test_inputs_sources_become_derived_from_and_provenance_entities(spec: ModelSpec) -> None:
    """Inputs with a source reference appear in derivedFrom and as Provenance source entities."""
    found = resources(build_report(make_completed(), spec, issued=ISSUED))

    derived = [r["reference"] for r in found["Observation"]["derivedFrom"]]
    assert derived[0] == "Observation/obs-rr-1"
    assert len(derived) == 6  # supplemental oxygen has no source reading
    entities = found["Provenance"]["entity"]
    assert [e["what"]["reference"] for e in entities] == derived
    assert {e["role"] for e in entities} == {"source"}


def test_same_result_gives_an_identical_report(spec: ModelSpec) -> None:
    """Building twice, or from a redelivery with a new event_id, gives byte-identical JSON."""
    first, second = make_completed(), make_completed()
    assert first.event_id != second.event_id

    one = build_report(first, spec, issued=ISSUED)
    assert build_report(first, spec, issued=ISSUED) == one
    assert json.dumps(build_report(second, spec, issued=ISSUED)) == json.dumps(one)


def test_ids_differ_between_correlation_ids(spec: ModelSpec) -> None:
    """Two clinical requests get disjoint resource ids."""
    a = build_report(make_completed(), spec, issued=ISSUED)
    other = make_completed(make_task(make_request(correlation_id="another-request")))
    b = build_report(other, spec, issued=ISSUED)

    ids_a = {a["id"], *(e["resource"]["id"] for e in a["entry"])}
    ids_b = {b["id"], *(e["resource"]["id"] for e in b["entry"])}
    assert len(ids_a) == 5
    assert ids_a.isdisjoint(ids_b)
    assert report_ids("another-request").bundle == b["id"]


def test_based_on_and_encounter_only_when_given(spec: ModelSpec) -> None:
    """basedOn and encounter appear on report and Observation only when the request has them."""
    plain = resources(build_report(make_completed(), spec, issued=ISSUED))
    ordered_request = make_request(
        encounter_reference="Encounter/enc-1", based_on_reference="ServiceRequest/sr-1"
    )
    ordered = resources(
        build_report(make_completed(make_task(ordered_request)), spec, issued=ISSUED)
    )

    for kind in ("DiagnosticReport", "Observation"):
        assert "basedOn" not in plain[kind]
        assert "encounter" not in plain[kind]
        assert ordered[kind]["basedOn"] == [{"reference": "ServiceRequest/sr-1"}]
        assert ordered[kind]["encounter"] == {"reference": "Encounter/enc-1"}


def test_performer_display_is_an_organization_reference(spec: ModelSpec) -> None:
    """A performer display becomes a display-only Organization reference, never a Device."""
    bundle = build_report(
        make_completed(), spec, performer_display="St Elsewhere AI service", issued=ISSUED
    )
    performer = resources(bundle)["DiagnosticReport"]["performer"]

    assert performer == [{"type": "Organization", "display": "St Elsewhere AI service"}]


def test_out_of_range_band_is_rejected(spec: ModelSpec) -> None:
    """A band index the spec does not define raises ReportBuildError."""
    outputs = {"SCORE": (7.0,), "RISK_BAND": (9.0,), "CONTRIBUTIONS": (0.0,) * 7}

    with pytest.raises(ReportBuildError, match="RISK_BAND 9 is not a band"):
        build_report(make_completed(outputs=outputs), spec, issued=ISSUED)


@pytest.mark.parametrize(
    ("outputs", "reason"),
    [
        ({"SCORE": (7.0,), "RISK_BAND": (3.0,)}, "CONTRIBUTIONS is missing"),
        ({"SCORE": (7.0,), "RISK_BAND": (3.0,), "CONTRIBUTIONS": (1.0,)}, "has 1 values"),
        ({"SCORE": (6.5,), "RISK_BAND": (2.0,), "CONTRIBUTIONS": (0.0,) * 7}, "not an integer"),
        ({"SCORE": (float("nan"),), "RISK_BAND": (2.0,), "CONTRIBUTIONS": (0.0,) * 7}, "finite"),
    ],
)
def test_outputs_that_do_not_fit_the_spec_are_rejected(
    spec: ModelSpec, outputs: dict[str, tuple[float, ...]], reason: str
) -> None:
    """Missing tensors, wrong lengths, fractional NEWS2 and NaN raise ReportBuildError."""
    with pytest.raises(ReportBuildError, match=reason):
        build_report(make_completed(outputs=outputs), spec, issued=ISSUED)


def test_invalid_fhir_is_rejected(spec: ModelSpec) -> None:
    """A result that cannot be valid FHIR (an empty subject reference) raises ReportBuildError."""
    bad_subject = make_request(subject_reference="")

    with pytest.raises(ReportBuildError, match="not valid FHIR R4B"):
        build_report(make_completed(make_task(bad_subject)), spec, issued=ISSUED)


def test_naive_issued_time_is_rejected(spec: ModelSpec) -> None:
    """An issued time without a timezone raises ReportBuildError."""
    with pytest.raises(ReportBuildError, match="timezone-aware"):
        build_report(make_completed(), spec, issued=datetime(2026, 11, 23, 8, 31))


def _risk_score(spec: ModelSpec, version: int) -> RiskScoreOutput:
    """The version's risk-score output (its bands and band code system)."""
    headline = spec.version(version).headline
    assert isinstance(headline, RiskScoreOutput)
    return headline


def _r5(completed_version: int = 1) -> Any:
    request = make_request()
    source = SourceContext(channel="http", fhir_version="R5")
    return make_completed(
        make_task(request.model_copy(update={"source": source}), model_version=completed_version)
    )


def test_conclusion_code_is_the_band_of_the_model(spec: ModelSpec) -> None:
    """conclusionCode carries the risk band in the model's band code system (no invented SNOMED)."""
    report = resources(build_report(make_completed(), spec, issued=ISSUED))["DiagnosticReport"]

    assert report["conclusionCode"] == [
        {
            "coding": [
                {
                    "system": _risk_score(spec, 1).band_system,
                    "code": "high",
                    "display": "High clinical risk",
                }
            ],
            "text": "High clinical risk",
        }
    ]


def test_reference_range_is_the_low_risk_range_of_the_version(spec: ModelSpec) -> None:
    """v1 gives NEWS2 0-4 in {score}; v2 gives 0-5 % as Observation.referenceRange."""
    v1 = resources(build_report(make_completed(), spec, issued=ISSUED))["Observation"]
    v2_completed = make_completed(make_task(model_version=2))
    v2 = resources(build_report(v2_completed, spec, issued=ISSUED))["Observation"]

    (range_v1,) = v1["referenceRange"]
    assert (range_v1["low"]["value"], range_v1["high"]["value"]) == (0, 4)
    assert range_v1["high"]["code"] == "{score}"
    assert "NEWS2 0-4" in range_v1["text"]
    (range_v2,) = v2["referenceRange"]
    assert (range_v2["low"]["value"], range_v2["high"]["value"]) == (0.0, 5.0)
    assert range_v2["high"]["code"] == "%"


def test_r5_source_gets_an_r5_report(spec: ModelSpec) -> None:
    """A request whose source spoke R5 gets a Bundle valid as R5, with R5's Device.name."""
    completed = _r5()
    bundle = build_report(completed, spec, issued=ISSUED)
    device = resources(bundle)["Device"]

    assert report_schema(completed) == FHIR_R5_JSON
    assert report_schema(make_completed()) == FHIR_R4B_JSON
    assert "deviceName" not in device
    assert device["name"][0] == {"value": "deterioration", "type": "registered-name"}
    assert device["type"] == [{"text": "AI model"}]
    R5Bundle.model_validate(bundle)
    with pytest.raises(ValidationError):
        R4BDevice.model_validate(device)


def test_r5_report_has_the_same_clinical_content_as_r4b(spec: ModelSpec) -> None:
    """Only the Device differs between the R4B and the R5 report of the same result."""
    r4b = resources(build_report(make_completed(), spec, issued=ISSUED))
    r5 = resources(build_report(_r5(), spec, issued=ISSUED))

    for kind in ("DiagnosticReport", "Observation", "Provenance"):
        assert r4b[kind] == r5[kind]
    assert r4b["Device"] != r5["Device"]


def test_sender_bundle_local_urn_references_are_not_copied_into_the_report(
    spec: ModelSpec,
) -> None:
    """Inputs known only by a urn:uuid of the sender's Bundle give no derivedFrom or entity."""
    request = make_request()
    inputs = tuple(
        i.model_copy(update={"source_reference": f"urn:uuid:{n:08d}-0000-4000-8000-000000000000"})
        for n, i in enumerate(request.inputs)
    )
    completed = make_completed(
        task=make_task(request=request.model_copy(update={"inputs": inputs}))
    )
    bundle = build_report(completed, spec, issued=ISSUED)
    assert check_report_bundle(bundle) == []
    assert "derivedFrom" not in resources(bundle)["Observation"]


def _with_band_absent(spec: ModelSpec, index: int, reason: str) -> ModelSpec:
    """The spec with one band turned into a "no result" band (data_absent_reason set)."""
    bands = tuple(
        b.model_copy(update={"data_absent_reason": reason}) if b.index == index else b
        for b in _risk_score(spec, 1).bands
    )
    versions = tuple(
        v.model_copy(
            update={
                "outputs": tuple(
                    o.model_copy(update={"bands": bands}) if isinstance(o, RiskScoreOutput) else o
                    for o in v.outputs
                )
            }
        )
        for v in spec.versions
    )
    return spec.model_copy(update={"versions": versions})


@pytest.mark.parametrize("r5", [False, True], ids=["R4B", "R5"])
def test_band_with_a_data_absent_reason_reports_no_value(spec: ModelSpec, r5: bool) -> None:
    """Any spec's band with data_absent_reason gives dataAbsentReason, no value or components."""
    absent = _with_band_absent(spec, 3, "not-a-number")
    bundle = build_report(_r5() if r5 else make_completed(), absent, issued=ISSUED)
    assert check_report_bundle(bundle, fhir_version="R5" if r5 else "R4B") == []
    observation = resources(bundle)["Observation"]
    assert not [key for key in observation if key.startswith("value")]
    assert observation["dataAbsentReason"] == {
        "coding": [
            {
                "system": "http://terminology.hl7.org/CodeSystem/data-absent-reason",
                "code": "not-a-number",
                "display": "Not a Number (NaN)",
            }
        ]
    }
    assert "component" not in observation
    assert "referenceRange" not in observation
    assert observation["interpretation"][0]["coding"][1]["code"] == "high"
    report = resources(bundle)["DiagnosticReport"]
    assert report["conclusion"] == "High clinical risk: no result (model deterioration v1)"
    assert report["conclusionCode"][0]["coding"][0]["code"] == "high"


def test_bands_without_a_data_absent_reason_keep_their_value(spec: ModelSpec) -> None:
    """A no-result band elsewhere in the spec changes nothing for a result in another band."""
    absent = _with_band_absent(spec, 0, "error")
    assert build_report(make_completed(), absent, issued=ISSUED) == build_report(
        make_completed(), spec, issued=ISSUED
    )


def test_observation_category_comes_from_the_spec(spec: ModelSpec) -> None:
    """Without report.observation_category the Observation is a "survey"; a spec can name another."""
    category = "http://terminology.hl7.org/CodeSystem/observation-category"
    survey = resources(build_report(make_completed(), spec, issued=ISSUED))["Observation"]
    assert survey["category"] == [
        {"coding": [{"system": category, "code": "survey", "display": "Survey"}]}
    ]
    raw = spec.model_dump(by_alias=True)
    raw["report"]["observation_category"] = {"system": category, "code": "exam"}
    exam_spec = ModelSpec.model_validate(raw)
    exam = resources(build_report(make_completed(), exam_spec, issued=ISSUED))["Observation"]
    assert exam["category"] == [{"coding": [{"system": category, "code": "exam"}]}]
