"""The proof that the builder makes valid FHIR: every kind of report it makes, in both FHIR
versions, validated with fhir.resources and held to our own conformance rules (narrative
included). Production builds reports without that validation (issue 17); it checks per report
only the rules of FHIR's primitive types that the builder's inputs can break, and these tests
show that those are real FHIR rules (fhir.resources refuses the same reports).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, get_args

import pytest

from medmesh_contracts.events import InferenceCompleted
from medmesh_contracts.modelspec import ModelSpec, OutputSpec, load_spec, parse_spec
from medmesh_reporting import report as report_module
from medmesh_reporting.report import (
    ReportBuildError,
    build_report,
    report_schema,
    validate_report,
)
from tests.conformance.report_cases import FHIR_VERSIONS, ISSUED, ROOT, report_cases
from tests.conformance.report_checks import check_report_bundle
from tests.factories import make_completed, make_request, make_task


@pytest.mark.parametrize("name", sorted(report_cases()))
def test_every_kind_of_report_is_valid_fhir(name: str) -> None:
    """Each case's report validates with fhir.resources (each resource, then the Bundle) and
    has no conformance problem, in its FHIR version."""
    case = report_cases()[name]
    bundle = case.build()

    validate_report(bundle, case.fhir_version)
    assert check_report_bundle(bundle, fhir_version=case.fhir_version) == []


def test_the_cases_cover_every_output_kind_in_every_fhir_version() -> None:
    """Every output kind a spec may declare, a negative findings result and a no-result band
    are among the cases, in R4, R4B and R5: a new kind needs a case here."""
    kinds = {model.model_fields["kind"].default for model in get_args(get_args(OutputSpec)[0])}
    for fhir_version in FHIR_VERSIONS:
        cases = [c for c in report_cases().values() if c.fhir_version == fhir_version]
        covered = {
            output.kind
            for case in cases
            for output in case.spec.version(case.completed.task.model_version).outputs
        }
        observations = [
            e["resource"]
            for case in cases
            for e in case.build()["entry"]
            if e["resource"]["resourceType"] == "Observation"
        ]
        values = {
            o.get("valueCodeableConcept", {}).get("coding", [{}])[0].get("code")
            for o in observations
        }

        assert covered == kinds, fhir_version
        assert "no-finding" in values, fhir_version
        assert any("dataAbsentReason" in o for o in observations), fhir_version


@pytest.fixture(scope="module")
def deterioration() -> ModelSpec:
    """The deterioration model's spec, as deployed."""
    return load_spec(ROOT / "deploy" / "models" / "deterioration.yaml")


def _changed(spec: ModelSpec, version: int, change: Callable[[dict[str, Any]], None]) -> ModelSpec:
    """The spec with a change to its version's first (risk-score) output."""
    document = spec.model_dump(by_alias=True, exclude_none=True)
    (found,) = (v for v in document["versions"] if v["version"] == version)
    change(found["outputs"][0])
    return parse_spec(document)


def _high_band(**changes: Any) -> Callable[[ModelSpec], ModelSpec]:
    """A change of v1's high band (band 3, the default result's)."""

    def change(output: dict[str, Any]) -> None:
        for band in output["bands"]:
            if band["index"] == 3:
                band.update(changes)

    return lambda spec: _changed(spec, 1, change)


def _unchanged(spec: ModelSpec) -> ModelSpec:
    return spec


@dataclass(frozen=True)
class Breakage:
    """An input that makes the report invalid FHIR, and where the build says it is."""

    where: str
    spec: Callable[[ModelSpec], ModelSpec] = _unchanged
    request: dict[str, Any] = field(default_factory=dict)
    model_version: int = 1
    outputs: dict[str, tuple[float, ...]] | None = None

    def inputs(self, spec: ModelSpec) -> tuple[ModelSpec, InferenceCompleted]:
        """The broken spec and result."""
        task = make_task(make_request(**self.request), model_version=self.model_version)
        return self.spec(spec), make_completed(task, outputs=self.outputs)


BREAKAGES: dict[str, Breakage] = {
    "empty-subject": Breakage(
        "Bundle.entry[0].resource.subject.reference is an empty string",
        request={"subject_reference": ""},
    ),
    "empty-correlation-id": Breakage(
        "Bundle.identifier.value is an empty string", request={"correlation_id": ""}
    ),
    "band-code-with-two-spaces": Breakage(
        "Bundle.entry[0].resource.conclusionCode[0].coding[0].code is not a FHIR code",
        spec=_high_band(code="very  high"),
    ),
    "empty-band-display": Breakage(
        "Bundle.entry[0].resource.conclusionCode[0].coding[0].display is an empty string",
        spec=_high_band(display=""),
    ),
    "infinite-range-bound": Breakage(
        "Bundle.entry[1].resource.referenceRange[0].high.value is not a finite number",
        spec=lambda s: _changed(s, 2, lambda o: o["reference_range"].update(high=math.inf)),
        model_version=2,
    ),
    "integer-beyond-32-bits": Breakage(
        "Bundle.entry[1].resource.valueInteger is beyond a FHIR integer",
        outputs={"SCORE": (2.0**31,), "RISK_BAND": (3.0,), "CONTRIBUTIONS": (0.0,) * 7},
    ),
}


@pytest.mark.parametrize("name", sorted(BREAKAGES))
def test_inputs_that_break_a_primitive_rule_fail_the_build(
    deterioration: ModelSpec, name: str
) -> None:
    """An input that breaks a FHIR primitive rule makes the build raise, naming the element."""
    spec, completed = BREAKAGES[name].inputs(deterioration)

    with pytest.raises(ReportBuildError, match="not valid FHIR R4B") as raised:
        build_report(completed, spec, issued=ISSUED)
    assert BREAKAGES[name].where in str(raised.value)


@pytest.mark.parametrize("name", sorted(BREAKAGES))
def test_fhir_resources_refuses_what_the_primitive_check_refuses(
    deterioration: ModelSpec, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Built without the per-report check, each such report fails full fhir.resources
    validation: the check enforces FHIR's rules, not rules of its own."""
    spec, completed = BREAKAGES[name].inputs(deterioration)
    monkeypatch.setattr(report_module, "_check_primitives", lambda bundle, version: None)
    bundle = build_report(completed, spec, issued=ISSUED)

    with pytest.raises(ReportBuildError, match="not valid FHIR R4B"):
        validate_report(bundle, "R4B")


def test_a_system_with_whitespace_fails_the_build(deterioration: ModelSpec) -> None:
    """A code system URI with a space fails the build: FHIR's uri has no whitespace (stricter
    than fhir.resources, whose uri pattern is not anchored)."""
    spec = _changed(deterioration, 1, lambda o: o.update(band_system="https://medmesh.dev/a b"))

    with pytest.raises(ReportBuildError, match=r"conclusionCode\[0\]\.coding\[0\]\.system"):
        build_report(make_completed(), spec, issued=ISSUED)


def test_validation_errors_name_elements_not_values(deterioration: ModelSpec) -> None:
    """Full validation's error names the invalid element and rule, never the value, which may
    be patient data."""
    bundle = build_report(make_completed(), deterioration, issued=ISSUED)
    bundle["entry"][0]["resource"]["subject"]["reference"] = 987654321

    with pytest.raises(ReportBuildError, match=r"subject\.reference") as raised:
        validate_report(bundle, "R4B")
    assert "987654321" not in str(raised.value)


THORAX = {"system": "http://snomed.info/sct", "code": "51185008", "display": "Thoracic structure"}


@pytest.mark.parametrize(
    ("fhir_version", "element"), [("R4", "imagingStudy"), ("R4B", "imagingStudy"), ("R5", "study")]
)
def test_an_imaging_report_references_the_study_it_read(fhir_version: str, element: str) -> None:
    """The DiagnosticReport of an image model names its ImagingStudy (R4 and R4B imagingStudy,
    R5 study), and each finding Observation is derived from it and names the series' body
    site."""
    case = report_cases()[f"chest-opacity-opacity-{fhir_version.lower()}"]
    resources = [e["resource"] for e in case.build()["entry"]]
    (report,) = [r for r in resources if r["resourceType"] == "DiagnosticReport"]
    assert report[element] == [{"reference": "ImagingStudy/cxr-1"}]
    observations = [r for r in resources if r["resourceType"] == "Observation"]
    assert observations
    for observation in observations:
        assert {"reference": "ImagingStudy/cxr-1"} in observation["derivedFrom"]
        assert observation["bodySite"] == {"coding": [THORAX]}
    others = report_cases()[f"deterioration-v1-{fhir_version.lower()}"].build()
    assert element not in others["entry"][0]["resource"]


def test_an_r4_report_keeps_r4s_narrower_subject_targets() -> None:
    """R4B lets a DiagnosticReport's subject be a Practitioner, R4 does not: the R4 validation
    refuses what the R4B models alone would pass, naming the element."""
    bundle = report_cases()["deterioration-v1-r4"].build()
    validate_report(bundle, "R4")
    bundle["entry"][0]["resource"]["subject"] = {"reference": "Practitioner/p-1"}

    validate_report(bundle, "R4B")
    with pytest.raises(ReportBuildError, match=r"entry\[0\]\.resource\.subject targets a Pr"):
        validate_report(bundle, "R4")


def test_an_r4_report_is_the_r4b_report_labelled_r4() -> None:
    """The report to an R4 source has the R4B report's content, and its schema header says R4."""
    for name in (
        "deterioration-v1",
        "ecg-rhythm-irregular",
        "chest-opacity-opacity",
        "vitals-panel-v1",
    ):
        r4, r4b = report_cases()[f"{name}-r4"], report_cases()[f"{name}-r4b"]
        assert r4.build() == r4b.build(), name
        assert report_schema(r4.completed) == "fhir.R4+json"
        assert report_schema(r4b.completed) == "fhir.R4B+json"
