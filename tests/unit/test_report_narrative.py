"""The generated narrative of every report resource: what a clinician reads in it, and that no
input text can turn into markup."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from medmesh_contracts.events import ModelInput
from medmesh_contracts.formatting import format_number
from medmesh_contracts.modelspec import ModelSpec, load_spec, parse_spec
from medmesh_reporting.narrative import XHTML_NAMESPACE, escape, measurement
from medmesh_reporting.report import AIAST, ai_disclaimer, build_report, validate_report
from tests.conformance.report_cases import report_cases
from tests.conformance.report_checks import check_report_bundle
from tests.factories import make_completed, make_inputs, make_request, make_task

ROOT = Path(__file__).resolve().parents[2]
ISSUED = datetime(2026, 11, 23, 8, 31, tzinfo=UTC)
RESOURCE_KINDS = ["DiagnosticReport", "Observation", "Device", "Provenance"]
HOSTILE = "<script>alert('x')</script> & <b onclick=\"steal()\">co</b>"


@pytest.fixture(scope="module")
def spec() -> ModelSpec:
    """The deterioration model's spec, as deployed."""
    return load_spec(ROOT / "deploy" / "models" / "deterioration.yaml")


def divs(bundle: dict[str, Any]) -> dict[str, str]:
    """Each resource kind's narrative div (the first resource of each kind)."""
    found: dict[str, str] = {}
    for entry in bundle["entry"]:
        resource = entry["resource"]
        found.setdefault(resource["resourceType"], resource["text"]["div"])
    return found


def text_of(div: str) -> str:
    """The narrative as a reader sees it: the XHTML's text, markup gone, entities resolved."""
    return "".join(ET.fromstring(div).itertext())  # noqa: S314 -- the builder's own output


@pytest.mark.parametrize("name", sorted(report_cases()))
def test_every_resource_carries_a_generated_xhtml_narrative(name: str) -> None:
    """Each resource of every kind of report, R4B and R5, has text.status generated and an XHTML
    div that ends with its model version's AI disclaimer."""
    case = report_cases()[name]
    bundle = case.build()
    label = f"{case.spec.name} v{case.completed.task.model_version}"

    kinds = [e["resource"]["resourceType"] for e in bundle["entry"]]
    assert set(kinds) == set(RESOURCE_KINDS)
    for entry in bundle["entry"]:
        text = entry["resource"]["text"]
        root = ET.fromstring(text["div"])  # noqa: S314 -- the builder's own output
        assert text["status"] == "generated"
        assert root.tag == f"{{{XHTML_NAMESPACE}}}div"
        assert text_of(text["div"]).endswith(ai_disclaimer(label))


@pytest.mark.parametrize("fhir_version", ["r4b", "r5"])
def test_report_and_observation_say_score_band_inputs_times_and_model(fhir_version: str) -> None:
    """The report's and the Observation's narratives say NEWS2 7, its band, each input with its
    value and observation time, the effective time, and the model version and algorithm."""
    bundle = report_cases()[f"deterioration-v1-{fhir_version}"].build()
    texts = {kind: text_of(div) for kind, div in divs(bundle).items()}

    report, observation = texts["DiagnosticReport"], texts["Observation"]
    assert "(NEWS2) total score 7: High clinical risk (model deterioration v1)" in report
    assert "(NEWS2) total score7High clinical risk" in report  # the results table's row
    assert "(NEWS2) total score: 7Interpretation: High clinical risk" in observation
    for kind in ("DiagnosticReport", "Observation"):
        read = texts[kind]
        assert "Respiratory rate22 /min2026-11-23 08:30 UTC" in read, kind
        assert "Body temperature38.4 °C" in read, kind
        assert "Supplemental oxygen (1 = on oxygen, 0 = air)0no reading: model default" in read
        assert "Effective: 2026-11-23 08:30 UTC" in read, kind
        assert "(deterioration v1): NEWS2 (Royal College of Physicians 2017" in read, kind
    assert "Contribution of Respiratory rate2 points" in texts["Observation"]
    assert "Contribution of Body temperature1 point" in texts["Observation"]
    assert "Reference range: NEWS2 0-4" in texts["Observation"]


def test_provenance_and_device_say_model_and_version(spec: ModelSpec) -> None:
    """The Provenance says what the model version created when, from which inputs; the Device
    names the model version, its owner and algorithm."""
    bundle = build_report(make_completed(), spec, issued=ISSUED)
    texts = {kind: text_of(div) for kind, div in divs(bundle).items()}

    assert "the report and its 1 result, by the AI model deterioration v1" in texts["Provenance"]
    assert "Heart rate112 /min2026-11-23 08:30 UTC" in texts["Provenance"]
    assert "Recorded: 2026-11-23 08:31 UTC" in texts["Provenance"]
    assert "Model versiondeterioration v1" in texts["Device"]
    assert "Ownermedmesh clinical AI team" in texts["Device"]


def test_device_narrative_holds_no_patient_fact(spec: ModelSpec) -> None:
    """The Device's narrative is the same for two patients' reports and names none of their
    facts: the FHIR server keeps one Device per model version for every report."""
    first = build_report(make_completed(), spec, issued=ISSUED)
    other_request = make_request(
        correlation_id="other-1",
        subject_reference="Patient/other-2",
        inputs=make_inputs({"heart_rate": 140.0}),
        effective_at=datetime(2026, 12, 1, 9, 0, tzinfo=UTC),
    )
    second = build_report(make_completed(make_task(other_request)), spec, issued=ISSUED)

    device = divs(first)["Device"]
    assert device == divs(second)["Device"]
    for fact in ("Patient/", "112", "140", "2026-11-23", "Respiratory rate"):
        assert fact not in device


def test_card_notes_are_listed_on_the_device(spec: ModelSpec) -> None:
    """A version with a model card lists its intended use and limitations on the Device."""
    bundle = report_cases()["deterioration-v3-r4b"].build()
    device = text_of(divs(bundle)["Device"])

    assert "Intended use: " in device
    assert "Limitations: " in device


def _hostile_spec(spec: ModelSpec) -> ModelSpec:
    """The spec with v1's high band and the heart-rate input displayed as markup."""
    document = spec.model_dump(by_alias=True, exclude_none=True)
    for band in document["versions"][0]["outputs"][0]["bands"]:
        if band["index"] == 3:
            band["display"] = HOSTILE
    for item in document["inputs"]:
        if item["name"] == "heart_rate":
            item["display"] = HOSTILE
    return parse_spec(document)


def test_hostile_texts_come_out_escaped(spec: ModelSpec) -> None:
    """Markup in a spec's band and input displays and in an event's input name and unit is
    text in every narrative: escaped, no script or handler, the report still valid FHIR."""
    hostile_input = ModelInput(
        name="<script>x</script>&amp;", value=1.5, unit="a&b<c>\x07", observed_at=ISSUED
    )
    request = make_request(inputs=(*make_inputs(), hostile_input))
    bundle = build_report(make_completed(make_task(request)), _hostile_spec(spec), issued=ISSUED)

    texts = divs(bundle)
    for kind, div in texts.items():
        assert "<script" not in div, kind
        assert "<b onclick" not in div, kind
    for kind in ("DiagnosticReport", "Observation", "Provenance"):
        assert "&lt;script&gt;alert('x')&lt;/script&gt; &amp; &lt;b onclick" in texts[kind]
        assert "&lt;script&gt;x&lt;/script&gt;&amp;amp;" in texts[kind]
        assert "1.5 a&amp;b&lt;c&gt;\ufffd" in texts[kind]
        assert HOSTILE in text_of(texts[kind])
    assert check_report_bundle(bundle) == []
    validate_report(bundle, "R4B")


@pytest.mark.parametrize(
    ("raw", "escaped"),
    [
        ("Heart rate", "Heart rate"),
        ("a < b & c > d", "a &lt; b &amp; c &gt; d"),
        ('say "hi"', 'say "hi"'),
        ("bell\x07 nul\x00 fffe\ufffe", "bell\ufffd nul\ufffd fffe\ufffd"),
    ],
)
def test_escape_makes_any_text_character_data(raw: str, escaped: str) -> None:
    """escape() escapes markup characters and replaces the characters XML cannot hold."""
    assert escape(raw) == escaped


@pytest.mark.parametrize(
    ("value", "unit", "read"),
    [
        (7, "{score}", "7 points"),
        (1.0, "{score}", "1 point"),
        (23.399999618530273, "%", "23.4 %"),
        (0.3495475649833679, "%", "0.35 %"),
        (38.4, "Cel", "38.4 °C"),
        (105.0, "mm[Hg]", "105 mmHg"),
        (0.0, "1", "0"),
        (1234.56, "/min", "1235 /min"),
        (0.000123, "{ratio}", "0.000123 ratio"),
    ],
)
def test_numbers_read_with_sensible_precision(value: float, unit: str, read: str) -> None:
    """Integers as they are, fractions to 3 significant digits without float noise or
    exponents, units as people write them."""
    assert measurement(value, unit) == read


def test_a_float_score_reads_without_its_float_noise(spec: ModelSpec) -> None:
    """A 32-bit float score (23.399999618530273) reads 23.4 % in the report and Observation."""
    outputs = {
        "SCORE": (23.399999618530273,),
        "RISK_BAND": (2.0,),
        "CONTRIBUTIONS": (0.41, 0.22, 0.0, 0.18, 0.15, 0.37, 0.0),
    }
    completed = make_completed(make_task(model_version=2), outputs=outputs)
    texts = divs(build_report(completed, spec, issued=ISSUED))

    for kind in ("DiagnosticReport", "Observation"):
        assert "23.4 %" in texts[kind]
        assert "23.39" not in texts[kind]
    assert format_number(0.41) == "0.41"


def test_a_result_without_a_value_reads_as_such() -> None:
    """The unreadable ECG's report and Observation say no value and the band, not a score of 0;
    its lead reads as a 10 s signal."""
    bundle = report_cases()["ecg-rhythm-unreadable-r4b"].build()
    texts = {kind: text_of(div) for kind, div in divs(bundle).items()}

    for kind in ("DiagnosticReport", "Observation"):
        assert "no value (Error)" in texts[kind]
        assert "ECG not interpretable" in texts[kind]
        assert "10 s signal, 2500 samples in mV" in texts[kind]
        assert "0 %" not in texts[kind]


def test_the_disclaimer_is_the_ai_label_in_words() -> None:
    """The narrative's disclaimer starts with the AIAST label's display: one wording for both."""
    assert ai_disclaimer("deterioration v1").startswith(f"{AIAST['display']}: ")
    assert "deterioration v1" in ai_disclaimer("deterioration v1")
