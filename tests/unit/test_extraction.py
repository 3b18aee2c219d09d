"""From FHIR payloads to model inputs: what ingest extracts (medmesh_ingest.extraction) and what
it then sends for a score (``readings.merge``), run through ``IngestService`` as production runs
it, each payload for patients without a stored state."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from medmesh_contracts.events import RequestInference
from medmesh_contracts.modelspec import ModelSpec, load_spec
from medmesh_ingest.extraction import as_aware_datetime
from tests.ingest_support import RECEIVED, Ingested, ingest

ROOT = Path(__file__).parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "fhir"
SPEC = load_spec(ROOT / "deploy" / "models" / "deterioration.yaml")
SPECS: dict[str, ModelSpec] = {SPEC.name: SPEC}
LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
UCUM = "http://unitsofmeasure.org"
T0 = "2026-11-23T08:00:00+00:00"
T1 = "2026-11-23T09:00:00+00:00"


# --- building payloads -------------------------------------------------------------------------


def concept(code: str, system: str = LOINC) -> dict[str, Any]:
    return {"coding": [{"system": system, "code": code}]}


def quantity(value: float, unit: str) -> dict[str, Any]:
    return {"value": value, "system": UCUM, "code": unit}


def vital(oid: str, code: str, value: float, unit: str, when: str | None = T0) -> dict[str, Any]:
    resource: dict[str, Any] = {
        "resourceType": "Observation",
        "id": oid,
        "status": "final",
        "code": concept(code),
        "subject": {"reference": "Patient/p1"},
        "valueQuantity": quantity(value, unit),
    }
    if when is not None:
        resource["effectiveDateTime"] = when
    return resource


def acvpu(oid: str, snomed: str, when: str = T0) -> dict[str, Any]:
    resource = vital(oid, "67775-7", 0, "1", when)
    del resource["valueQuantity"]
    resource["valueCodeableConcept"] = concept(snomed, SNOMED)
    return resource


def bp_panel(oid: str, systolic: float, diastolic: float, when: str = T0) -> dict[str, Any]:
    resource = vital(oid, "85354-9", 0, "mm[Hg]", when)
    del resource["valueQuantity"]
    resource["component"] = [
        {"code": concept("8462-4"), "valueQuantity": quantity(diastolic, "mm[Hg]")},
        {"code": concept("8480-6"), "valueQuantity": quantity(systolic, "mm[Hg]")},
    ]
    return resource


def base_vitals(*, without: str = "") -> list[dict[str, Any]]:
    """A full set of NEWS2 readings (all scoring 0), except the one named."""
    readings = {
        "rr": vital("rr", "9279-1", 16, "/min"),
        "spo2": vital("spo2", "59408-5", 97, "%"),
        "temp": vital("temp", "8310-5", 37.0, "Cel"),
        "sbp": vital("sbp", "8480-6", 120, "mm[Hg]"),
        "hr": vital("hr", "8867-4", 70, "/min"),
        "acvpu": acvpu("acvpu", "248234008"),
    }
    return [r for name, r in readings.items() if name != without]


def run(*observations: dict[str, Any], bundle_type: str = "collection") -> Ingested:
    entries = [{"resource": {"resourceType": "Patient", "id": "p1"}}]
    entries += [{"resource": o} for o in observations]
    payload = {"resourceType": "Bundle", "type": bundle_type, "entry": entries}
    return ingest(json.dumps(payload).encode(), SPECS, received_at=RECEIVED)


def only(ingested: Ingested) -> RequestInference:
    assert len(ingested.requests) == 1, ingested
    return ingested.requests[0]


def value(ingested: Ingested, name: str) -> float:
    return {i.name: i.value for i in only(ingested).inputs}[name]


def source(ingested: Ingested, name: str) -> str | None:
    return {i.name: i.source_reference for i in only(ingested).inputs}[name]


# --- choosing readings -------------------------------------------------------------------------


def test_full_set_of_readings_gives_inputs_in_spec_order() -> None:
    """A complete set of readings gives one request with the inputs in the spec's order."""
    result = only(run(*base_vitals()))
    assert [i.name for i in result.inputs] == [i.name for i in SPEC.inputs]
    assert [i.unit for i in result.inputs] == [i.unit for i in SPEC.inputs]
    assert result.model == "deterioration"
    assert result.subject_reference == "Patient/p1"


def test_latest_reading_wins() -> None:
    """Of two readings of one input, the later one is used, wherever it is in the payload."""
    later = vital("hr-later", "8867-4", 118, "/min", T1)
    ingested = run(later, *base_vitals())
    assert value(ingested, "heart_rate") == 118.0
    assert source(ingested, "heart_rate") == "Observation/hr-later"


def test_untimed_reading_loses_to_timed_one() -> None:
    """A reading with no time loses to a timed one."""
    untimed = vital("hr-untimed", "8867-4", 150, "/min", when=None)
    assert value(run(*base_vitals(), untimed), "heart_rate") == 70.0


def test_period_end_and_issued_give_the_time() -> None:
    """effectivePeriod.end, else issued, is the reading's time."""
    by_period = vital("hr-period", "8867-4", 101, "/min", when=None)
    by_period["effectivePeriod"] = {"start": T0, "end": "2026-11-23T10:00:00+00:00"}
    by_issued = vital("hr-issued", "8867-4", 99, "/min", when=None)
    by_issued["issued"] = T1
    ingested = run(*base_vitals(), by_issued, by_period)
    assert value(ingested, "heart_rate") == 101.0


def test_entered_in_error_and_cancelled_readings_are_skipped() -> None:
    """Observations entered-in-error or cancelled carry no reading."""
    wrong = vital("hr-wrong", "8867-4", 180, "/min", T1) | {"status": "entered-in-error"}
    cancelled = vital("hr-cancelled", "8867-4", 30, "/min", T1) | {"status": "cancelled"}
    assert value(run(*base_vitals(), wrong, cancelled), "heart_rate") == 70.0


def test_effective_at_is_the_latest_reading_used() -> None:
    """The request's effective_at is the latest observed_at among the inputs used."""
    later = vital("rr-later", "9279-1", 18, "/min", T1)
    result = only(run(*base_vitals(), later))
    assert result.effective_at == datetime(2026, 11, 23, 9, 0, tzinfo=UTC)


def test_effective_at_falls_back_to_received_at_without_times() -> None:
    """When no reading has a time, the request's effective_at is when the payload arrived."""
    untimed = [{k: v for k, v in o.items() if k != "effectiveDateTime"} for o in base_vitals()]
    assert only(run(*untimed)).effective_at == RECEIVED


def test_second_spo2_source_is_used() -> None:
    """SpO2 may come from 2708-6 as well as from 59408-5."""
    sao2 = vital("sao2", "2708-6", 93, "%", T1)
    ingested = run(*base_vitals(), sao2)
    assert value(ingested, "spo2") == 93.0


def test_encounter_of_the_readings_is_kept() -> None:
    """The request's encounter_reference is the encounter named by the readings."""
    readings = [o | {"encounter": {"reference": "Encounter/e1"}} for o in base_vitals()]
    assert only(run(*readings)).encounter_reference == "Encounter/e1"


def test_readings_of_other_codes_and_other_resources_are_ignored() -> None:
    """Observations of other codes, and resources other than Observation, are not read: no
    request, no state, only the note that nothing matched a deployed model."""
    weight = vital("weight", "29463-7", 80, "kg")
    ingested = run(weight)
    assert ingested.requests == ()
    assert ingested.states == ()
    assert [i.code for i in ingested.issues] == ["not-found"]


# --- converting values -------------------------------------------------------------------------


def test_blood_pressure_panel_component_gives_systolic() -> None:
    """Systolic pressure is read from the 8480-6 component of an 85354-9 panel."""
    ingested = run(*base_vitals(without="sbp"), bp_panel("bp", 98, 60))
    assert value(ingested, "systolic_bp") == 98.0
    assert source(ingested, "systolic_bp") == "Observation/bp"


def test_fahrenheit_temperature_is_converted() -> None:
    """A temperature in [degF] becomes Cel."""
    fahrenheit = vital("temp-f", "8310-5", 101.3, "[degF]", T1)
    assert value(run(*base_vitals(), fahrenheit), "temperature") == pytest.approx(38.5)


def test_unit_text_is_used_when_the_code_is_absent() -> None:
    """valueQuantity.unit stands in for a missing UCUM code."""
    hr = vital("hr-text", "8867-4", 88, "/min", T1)
    hr["valueQuantity"] = {"value": 88, "unit": "{beats}/min"}
    assert value(run(*base_vitals(), hr), "heart_rate") == 88.0


@pytest.mark.parametrize(
    ("code", "amount", "unit", "expected"),
    [
        ("3151-8", 2, "L/min", 1.0),
        ("3151-8", 0, "L/min", 0.0),
        ("3151-8", 500, "mL/min", 1.0),
        ("3150-0", 28, "%", 1.0),
        ("3150-0", 21, "%", 0.0),
    ],
)
def test_oxygen_indicator(code: str, amount: float, unit: str, expected: float) -> None:
    """Oxygen is on (1) when flow > 0 L/min or inspired concentration > 21 %, else air (0)."""
    oxygen = vital("o2", code, amount, unit)
    ingested = run(*base_vitals(), oxygen)
    assert value(ingested, "supplemental_oxygen") == expected
    assert source(ingested, "supplemental_oxygen") == "Observation/o2"


def test_no_oxygen_reading_means_air() -> None:
    """Without an oxygen reading the optional input takes its default, air (0)."""
    result = only(run(*base_vitals()))
    oxygen = next(i for i in result.inputs if i.name == "supplemental_oxygen")
    assert oxygen.value == 0.0
    assert oxygen.source_reference is None
    assert oxygen.observed_at is None


def test_latest_oxygen_reading_wins_across_sources() -> None:
    """The latest oxygen reading wins, whichever source: FiO2 21 % after 2 L/min means air."""
    flow = vital("o2-flow", "3151-8", 2, "L/min", T0)
    fio2 = vital("o2-fio2", "3150-0", 21, "%", T1)
    ingested = run(*base_vitals(), fio2, flow)
    assert value(ingested, "supplemental_oxygen") == 0.0
    assert source(ingested, "supplemental_oxygen") == "Observation/o2-fio2"


@pytest.mark.parametrize(
    ("answer", "expected"),
    [("248234008", 0.0), ("300202002", 1.0), ("450847001", 1.0), ("422768004", 1.0)],
)
def test_acvpu_answers_are_mapped(answer: str, expected: float) -> None:
    """ACVPU: Alert (248234008) is 0; voice, pain, unresponsive (any other answer) are 1."""
    ingested = run(*base_vitals(without="acvpu"), acvpu("acvpu", answer))
    assert value(ingested, "not_alert") == expected


def test_acvpu_with_text_only_is_not_alert() -> None:
    """A coded answer with no coding we know takes the spec's 'otherwise' value."""
    text_only = acvpu("acvpu", "248234008")
    text_only["valueCodeableConcept"] = {"text": "drowsy"}
    assert value(run(*base_vitals(without="acvpu"), text_only), "not_alert") == 1.0


# --- problems ----------------------------------------------------------------------------------


def test_missing_required_input_makes_the_patient_incomplete() -> None:
    """A patient with some but not all required inputs gets no request: its readings are kept
    (the model's state of the patient) and the sender is told which inputs are missing."""
    ingested = run(*base_vitals(without="spo2"))
    assert ingested.requests == ()
    [state] = ingested.states
    assert state.model == "deterioration"
    assert state.subject_reference == "Patient/p1"
    assert ingested.missing == [("spo2",)]


def test_unit_error_is_an_issue_and_the_reading_is_ignored() -> None:
    """A heart rate in kg is an error issue at its valueQuantity.code; the reading is ignored."""
    in_kg = vital("hr-kg", "8867-4", 80, "kg", T1)
    ingested = run(*base_vitals(), in_kg)
    assert value(ingested, "heart_rate") == 70.0
    [issue] = ingested.issues
    assert issue.severity == "error"
    assert issue.code == "value"
    assert issue.expression == ("Bundle.entry[7].resource.valueQuantity.code",)


def test_only_reading_with_a_unit_error_leaves_the_input_missing() -> None:
    """When the only reading of an input has a bad unit, the input is missing: one issue for the
    unit, one naming the missing input."""
    in_kg = vital("hr", "8867-4", 80, "kg")
    ingested = run(*base_vitals(without="hr"), in_kg)
    assert ingested.requests == ()
    assert ingested.missing == [("heart_rate",)]
    assert [i.code for i in ingested.issues] == ["value", "incomplete"]


def test_non_ucum_unit_system_is_an_issue() -> None:
    """A quantity coded in a system other than UCUM is an issue at valueQuantity.system."""
    odd = vital("hr-odd", "8867-4", 80, "/min", T1)
    odd["valueQuantity"]["system"] = "http://example.org/units"
    [issue] = run(*base_vitals(), odd).issues
    assert issue.expression == ("Bundle.entry[7].resource.valueQuantity.system",)


def test_component_unit_error_points_at_the_component() -> None:
    """A unit error inside a panel component is located at that component."""
    panel = bp_panel("bp", 98, 60)
    panel["component"][1]["valueQuantity"] = quantity(98, "kg")
    [issue] = run(*base_vitals(), panel).issues
    assert issue.expression == ("Bundle.entry[7].resource.component[1].valueQuantity.code",)


def test_reading_without_a_value_is_a_warning() -> None:
    """A matching Observation without valueQuantity is ignored with a warning."""
    empty = vital("hr-empty", "8867-4", 0, "/min", T1)
    del empty["valueQuantity"]
    empty["dataAbsentReason"] = concept("not-performed", "http://example.org/absent")
    ingested = run(*base_vitals(), empty)
    assert value(ingested, "heart_rate") == 70.0
    assert [i.severity for i in ingested.issues] == ["warning"]


def test_observation_without_usable_subject_is_ignored_with_a_warning() -> None:
    """An Observation with no literal Patient reference is not read, and a warning says so."""
    logical = vital("hr", "8867-4", 80, "/min")
    logical["subject"] = {"identifier": {"system": "urn:mrn", "value": "x"}}
    ingested = run(logical)
    assert ingested.requests == ()
    assert ingested.states == ()
    [issue] = ingested.issues
    assert issue.expression == ("Bundle.entry[1].resource.subject",)


def test_patients_are_extracted_separately() -> None:
    """Readings of two patients in one Bundle are merged per patient: the complete one gets a
    request, the other keeps its readings and lacks its temperature."""
    other = [o | {"subject": {"reference": "Patient/p2"}} for o in base_vitals(without="temp")]
    ingested = run(*base_vitals(), *other)
    assert [r.subject_reference for r in ingested.requests] == ["Patient/p1"]
    assert sorted(s.subject_reference for s in ingested.states) == ["Patient/p1", "Patient/p2"]
    assert ingested.missing == [("temperature",)]


# --- times -------------------------------------------------------------------------------------


def test_as_aware_datetime_handles_dates_and_partial_dates() -> None:
    """Dates and partial dates become their first instant in UTC; aware datetimes stay."""
    plus_one = datetime(2026, 11, 23, 8, 0, tzinfo=timezone(timedelta(hours=1)))
    assert as_aware_datetime(plus_one) == plus_one
    assert as_aware_datetime(date(2026, 11, 23)) == datetime(2026, 11, 23, tzinfo=UTC)
    assert as_aware_datetime("2026-11") == datetime(2026, 11, 1, tzinfo=UTC)
    assert as_aware_datetime("2026") == datetime(2026, 1, 1, tzinfo=UTC)


# --- fixtures ----------------------------------------------------------------------------------

EXPECTED_INPUTS = {
    "vitals-bundle-high.json": {
        "respiratory_rate": 24.0,
        "spo2": 91.0,
        "supplemental_oxygen": 1.0,
        "temperature": 38.5,
        "systolic_bp": 98.0,
        "heart_rate": 118.0,
        "not_alert": 1.0,
    },
    "vitals-bundle-medium.json": {
        "respiratory_rate": 22.0,
        "spo2": 95.0,
        "supplemental_oxygen": 1.0,
        "temperature": 37.9,
        "systolic_bp": 112.0,
        "heart_rate": 92.0,
        "not_alert": 0.0,
    },
    "vitals-bundle-low.json": {
        "respiratory_rate": 16.0,
        "spo2": 97.0,
        "supplemental_oxygen": 0.0,
        "temperature": 35.8,
        "systolic_bp": 124.0,
        "heart_rate": 72.0,
        "not_alert": 0.0,
    },
}
EXPECTED_SUBJECTS = {
    "vitals-bundle-high.json": "Patient/example-high",
    "vitals-bundle-medium.json": "Patient/example-medium",
    "vitals-bundle-low.json": "Patient/example-low",
}
EXPECTED_MISSING = {
    "observation-heart-rate.json": (
        "respiratory_rate",
        "spo2",
        "temperature",
        "systolic_bp",
        "not_alert",
    ),
    "bundle-missing-spo2.json": ("spo2",),
}


def ingest_fixture(name: str) -> Ingested:
    return ingest((FIXTURES / name).read_bytes(), SPECS)


@pytest.mark.parametrize("name", sorted(EXPECTED_INPUTS))
def test_vitals_fixtures_give_the_expected_inputs(name: str) -> None:
    """The vitals fixtures give the inputs listed in tests/fixtures/fhir/EXPECTED.md."""
    ingested = ingest_fixture(name)
    result = only(ingested)
    assert ingested.issues == ()
    assert result.subject_reference == EXPECTED_SUBJECTS[name]
    values = {i.name: i.value for i in result.inputs}
    assert values == pytest.approx(EXPECTED_INPUTS[name])
    assert all(i.observed_at is None or i.observed_at.tzinfo for i in result.inputs)


@pytest.mark.parametrize("name", sorted(EXPECTED_MISSING))
def test_incomplete_fixtures_name_the_missing_inputs(name: str) -> None:
    """The incomplete fixtures give no request, only the missing input names."""
    ingested = ingest_fixture(name)
    assert ingested.requests == ()
    assert ingested.missing == [EXPECTED_MISSING[name]]


def test_high_fixture_details() -> None:
    """High: latest heart rate, panel source, encounter and effective_at of the ACVPU reading."""
    result = only(ingest_fixture("vitals-bundle-high.json"))
    sources = {i.name: i.source_reference for i in result.inputs}
    assert sources["heart_rate"] == "Observation/example-high-hr"
    assert sources["systolic_bp"] == "Observation/example-high-bp"
    assert result.encounter_reference == "Encounter/example-high-admission"
    assert result.effective_at == datetime(2026, 11, 23, 8, 12, tzinfo=UTC)


def test_urn_subjects_resolve_in_the_low_fixture() -> None:
    """Low: urn:uuid subjects resolve to Patient/example-low; sources are the urn fullUrls."""
    result = only(ingest_fixture("vitals-bundle-low.json"))
    assert result.subject_reference == "Patient/example-low"
    used = [i.source_reference for i in result.inputs]
    assert all(s is not None and s.startswith("urn:uuid:") for s in used)
