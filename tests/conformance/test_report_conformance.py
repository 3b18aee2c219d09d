"""Reports conform to the FHIR rules medmesh holds itself to, beyond what fhir.resources checks."""

from __future__ import annotations

import copy
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from fhir.resources.R4B.bundle import Bundle

from medmesh_contracts.events import ModelInput
from medmesh_contracts.modelspec import load_spec
from medmesh_reporting.report import build_report
from tests.conformance.report_checks import check_report_bundle
from tests.factories import make_completed, make_request, make_task

ROOT = Path(__file__).resolve().parents[2]
ISSUED = datetime(2026, 11, 23, 8, 31, tzinfo=UTC)
ABSENT_ERROR = {
    "system": "http://terminology.hl7.org/CodeSystem/data-absent-reason",
    "code": "error",
}

JsonDict = dict[str, Any]


@pytest.fixture(scope="module")
def report() -> JsonDict:
    """A v1 report with every optional part (encounter, order, performer) present."""
    spec = load_spec(ROOT / "deploy" / "models" / "deterioration.yaml")
    request = make_request(
        encounter_reference="Encounter/enc-1", based_on_reference="ServiceRequest/sr-1"
    )
    completed = make_completed(make_task(request))
    return build_report(completed, spec, performer_display="medmesh", issued=ISSUED)


def entry(bundle: JsonDict, kind: str) -> JsonDict:
    """The first resource of a kind in a Bundle."""
    return next(e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == kind)


def bad_report_status(bundle: JsonDict) -> None:
    """DiagnosticReport.status outside its required value set."""
    entry(bundle, "DiagnosticReport")["status"] = "bogus"


def subject_is_an_observation(bundle: JsonDict) -> None:
    """DiagnosticReport.subject pointing at an Observation."""
    entry(bundle, "DiagnosticReport")["subject"] = {"reference": "Observation/obs-hr-1"}


def dangling_result(bundle: JsonDict) -> None:
    """DiagnosticReport.result naming a urn:uuid that is not in the Bundle."""
    entry(bundle, "DiagnosticReport")["result"] = [
        {"reference": "urn:uuid:00000000-0000-5000-8000-000000000000"}
    ]


def no_ai_label(bundle: JsonDict) -> None:
    """The Observation without its AIAST security label."""
    del entry(bundle, "Observation")["meta"]["security"]


def result_is_the_device(bundle: JsonDict) -> None:
    """DiagnosticReport.result pointing at the Device entry."""
    device = next(e for e in bundle["entry"] if e["resource"]["resourceType"] == "Device")
    entry(bundle, "DiagnosticReport")["result"] = [{"reference": device["fullUrl"]}]


def no_provenance(bundle: JsonDict) -> None:
    """The Provenance entry removed (its targets stay valid)."""
    bundle["entry"] = [e for e in bundle["entry"] if e["resource"]["resourceType"] != "Provenance"]


def no_issued(bundle: JsonDict) -> None:
    """DiagnosticReport without issued."""
    del entry(bundle, "DiagnosticReport")["issued"]


def no_value(bundle: JsonDict) -> None:
    """Observation with neither value[x] nor dataAbsentReason."""
    del entry(bundle, "Observation")["valueInteger"]


def interpretation_without_v3(bundle: JsonDict) -> None:
    """Observation.interpretation carrying only the model's own band coding."""
    interpretation = entry(bundle, "Observation")["interpretation"][0]
    interpretation["coding"] = interpretation["coding"][1:]


def bad_bundle_type(bundle: JsonDict) -> None:
    """Bundle.type outside its required value set."""
    bundle["type"] = "pile"


def empty_reference_range(bundle: JsonDict) -> None:
    """Observation.referenceRange with neither low, high nor text (obs-3)."""
    entry(bundle, "Observation")["referenceRange"] = [{"appliesTo": [{"text": "adults"}]}]


def value_and_data_absent_reason(bundle: JsonDict) -> None:
    """Observation with both value[x] and dataAbsentReason (obs-6)."""
    entry(bundle, "Observation")["dataAbsentReason"] = {"coding": [dict(ABSENT_ERROR)]}


def uncoded_data_absent_reason(bundle: JsonDict) -> None:
    """Observation whose value is replaced by a dataAbsentReason with text only."""
    observation = entry(bundle, "Observation")
    del observation["valueInteger"]
    observation["dataAbsentReason"] = {"text": "could not be read"}


def component_without_value(bundle: JsonDict) -> None:
    """Observation component with neither value[x] nor dataAbsentReason."""
    del entry(bundle, "Observation")["component"][0]["valueQuantity"]


def component_value_and_data_absent_reason(bundle: JsonDict) -> None:
    """Observation component with both value[x] and dataAbsentReason."""
    component = entry(bundle, "Observation")["component"][2]
    component["dataAbsentReason"] = {"coding": [dict(ABSENT_ERROR)]}


def no_narrative(bundle: JsonDict) -> None:
    """The Observation without its narrative (dom-6)."""
    del entry(bundle, "Observation")["text"]


def narrative_not_generated(bundle: JsonDict) -> None:
    """The Device's narrative claiming to be written by hand ('additional')."""
    entry(bundle, "Device")["text"]["status"] = "additional"


def script_in_narrative(bundle: JsonDict) -> None:
    """A script element inside the DiagnosticReport's narrative."""
    text = entry(bundle, "DiagnosticReport")["text"]
    text["div"] = text["div"].replace("</div>", "<script>alert(1)</script></div>")


def event_handler_in_narrative(bundle: JsonDict) -> None:
    """An onclick attribute on a paragraph of the Provenance's narrative."""
    text = entry(bundle, "Provenance")["text"]
    text["div"] = text["div"].replace("<p>", '<p onclick="steal()">', 1)


def narrative_not_xhtml(bundle: JsonDict) -> None:
    """The Observation's narrative div without the XHTML namespace."""
    text = entry(bundle, "Observation")["text"]
    text["div"] = text["div"].replace(' xmlns="http://www.w3.org/1999/xhtml"', "")


def unescaped_narrative(bundle: JsonDict) -> None:
    """An unescaped '&' and '<' in the Observation's narrative: not well-formed XML."""
    text = entry(bundle, "Observation")["text"]
    text["div"] = text["div"].replace("</div>", "<p>A & B < C</p></div>")


BREAKAGES: list[tuple[Callable[[JsonDict], None], str]] = [
    (bad_report_status, "Bundle.entry[0].resource.ofType(DiagnosticReport).status"),
    (subject_is_an_observation, "Bundle.entry[0].resource.ofType(DiagnosticReport).subject"),
    (dangling_result, "Bundle.entry[0].resource.ofType(DiagnosticReport).result[0].reference"),
    (no_ai_label, "Bundle.entry[1].resource.ofType(Observation).meta.security"),
    (result_is_the_device, "Bundle.entry[0].resource.ofType(DiagnosticReport).result[0]"),
    (no_provenance, "Bundle.entry"),
    (no_issued, "Bundle.entry[0].resource.ofType(DiagnosticReport).issued"),
    (no_value, "Bundle.entry[1].resource.ofType(Observation).value"),
    (interpretation_without_v3, "Bundle.entry[1].resource.ofType(Observation).interpretation"),
    (bad_bundle_type, "Bundle.type"),
    (empty_reference_range, "Bundle.entry[1].resource.ofType(Observation).referenceRange[0]"),
    (value_and_data_absent_reason, "Bundle.entry[1].resource.ofType(Observation).dataAbsentReason"),
    (
        uncoded_data_absent_reason,
        "Bundle.entry[1].resource.ofType(Observation).dataAbsentReason.coding",
    ),
    (component_without_value, "Bundle.entry[1].resource.ofType(Observation).component[0].value"),
    (
        component_value_and_data_absent_reason,
        "Bundle.entry[1].resource.ofType(Observation).component[2].dataAbsentReason",
    ),
    (no_narrative, "Bundle.entry[1].resource.ofType(Observation).text"),
    (narrative_not_generated, "Bundle.entry[2].resource.ofType(Device).text.status"),
    (script_in_narrative, "Bundle.entry[0].resource.ofType(DiagnosticReport).text.div: <script>"),
    (event_handler_in_narrative, "Bundle.entry[3].resource.ofType(Provenance).text.div: <p> has"),
    (narrative_not_xhtml, "Bundle.entry[1].resource.ofType(Observation).text.div: the root"),
    (unescaped_narrative, "Bundle.entry[1].resource.ofType(Observation).text.div: not well"),
]


def test_built_report_conforms(report: JsonDict) -> None:
    """A report from the builder, with every optional part, has no conformance problem."""
    assert check_report_bundle(report) == []


@pytest.mark.parametrize(
    ("breakage", "location"),
    [pytest.param(b, loc, id=b.__name__) for b, loc in BREAKAGES],
)
def test_broken_copy_is_flagged_at_its_location(
    report: JsonDict, breakage: Callable[[JsonDict], None], location: str
) -> None:
    """Each deliberately broken copy of a good report yields exactly one problem, located."""
    broken = copy.deepcopy(report)
    breakage(broken)

    problems = check_report_bundle(broken)

    assert len(problems) == 1, problems
    assert problems[0].startswith(location), problems


@pytest.mark.parametrize(
    "breakage",
    [
        bad_report_status,
        subject_is_an_observation,
        dangling_result,
        no_ai_label,
        no_narrative,
        script_in_narrative,
        event_handler_in_narrative,
        unescaped_narrative,
    ],
    ids=lambda b: b.__name__,
)
def test_fhir_resources_accepts_what_our_checks_flag(
    report: JsonDict, breakage: Callable[[JsonDict], None]
) -> None:
    """fhir.resources validates these broken copies, which is why our own checks exist."""
    broken = copy.deepcopy(report)
    breakage(broken)

    Bundle.model_validate(broken)
    assert check_report_bundle(broken) != []


def test_junk_is_reported_not_raised() -> None:
    """A dict that is not a Bundle yields a problem instead of an exception."""
    assert check_report_bundle({"resourceType": "Observation"}) == [
        "Bundle.resourceType: expected 'Bundle', got 'Observation'"
    ]


def test_provenance_role_value_set_follows_the_fhir_version(report: JsonDict) -> None:
    """'derivation' is a Provenance entity role in R4B but not in R5, 'instantiates' the reverse."""
    derivation = copy.deepcopy(report)
    entry(derivation, "Provenance")["entity"][0]["role"] = "derivation"
    instantiates = copy.deepcopy(report)
    entry(instantiates, "Provenance")["entity"][0]["role"] = "instantiates"

    assert check_report_bundle(derivation, fhir_version="R4B") == []
    assert len(check_report_bundle(derivation, fhir_version="R5")) == 1
    assert check_report_bundle(instantiates, fhir_version="R5") == []
    assert len(check_report_bundle(instantiates, fhir_version="R4B")) == 1


@pytest.fixture(scope="module")
def unreadable_ecg_report() -> JsonDict:
    """An ecg-rhythm report of an unreadable ECG (band 2: no value, dataAbsentReason)."""
    spec = load_spec(ROOT / "deploy" / "models" / "ecg-rhythm.yaml")
    lead = ModelInput(
        name="ecg_lead_ii",
        value=0.0,
        unit="mV",
        source_reference="Observation/ecg-1",
        samples=(0.0,) * 2500,
        period_ms=4.0,
        duration_s=9.996,
    )
    outputs = {"SCORE": (0.0,), "RHYTHM_BAND": (2.0,), "FEATURES": (0.0,) * 5}
    completed = make_completed(
        make_task(make_request(model="ecg-rhythm", inputs=(lead,))), outputs=outputs
    )
    return build_report(completed, spec, issued=ISSUED)


def test_report_without_a_value_conforms(unreadable_ecg_report: JsonDict) -> None:
    """A report whose Observation has dataAbsentReason instead of value[x] has no problem."""
    observation = entry(unreadable_ecg_report, "Observation")
    assert "dataAbsentReason" in observation
    assert check_report_bundle(unreadable_ecg_report) == []


def test_report_without_a_value_given_one_is_flagged(unreadable_ecg_report: JsonDict) -> None:
    """The unreadable ECG's Observation given back a value has both: one obs-6 problem."""
    broken = copy.deepcopy(unreadable_ecg_report)
    entry(broken, "Observation")["valueQuantity"] = {"value": 0.0, "unit": "%"}

    assert check_report_bundle(broken) == [
        "Bundle.entry[1].resource.ofType(Observation).dataAbsentReason:"
        " only when value[x] is absent (obs-6)"
    ]
