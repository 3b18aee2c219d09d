"""Every kind of report the builder makes, in both FHIR versions: the cases the conformance suite
proves valid (test_report_validity.py) and the narrative tests read.

A case is a model spec and a completed inference: the deployed models (deterioration v1-v3, the
ECG rhythm screen v1-v2, its unreadable-ECG band) and a fictional panel model whose versions
cover the output kinds no deployed model uses (classification with findings, quantity and an
explanation; a negative findings result; a quantity alone).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any

from medmesh_contracts.events import (
    BodySiteCoding,
    FhirVersion,
    ImageReference,
    InferenceCompleted,
    ModelInput,
    RequestInference,
    SourceContext,
)
from medmesh_contracts.modelspec import ModelSpec, load_spec, parse_spec
from medmesh_reporting.report import JsonDict, build_report
from tests.factories import (
    EFFECTIVE_AT,
    PANEL_ALL_OUTPUTS,
    PANEL_FINDINGS,
    PANEL_QUANTITY,
    PANEL_VALUES,
    make_completed,
    make_request,
    make_task,
    panel_model,
)

ROOT = Path(__file__).resolve().parents[2]
ISSUED = datetime(2026, 11, 23, 8, 31, tzinfo=UTC)
PERFORMER = "St Elsewhere NHS Trust clinical AI service"
FHIR_VERSIONS: tuple[FhirVersion, ...] = ("R4", "R4B", "R5")


# The fictional panel model (tests.factories.panel_model): version 1 has a classification headline
# with findings, a quantity and an explanation; version 2 findings alone; version 3 a quantity alone.
_PANEL_VERSIONS: dict[int, tuple[dict[str, Any], ...]] = {
    1: PANEL_ALL_OUTPUTS,
    2: (PANEL_FINDINGS,),
    3: (PANEL_QUANTITY,),
}
PANEL_OUTPUTS: dict[int, dict[str, tuple[float, ...]]] = {
    1: PANEL_VALUES,
    2: {"FINDINGS_P": (0.1, 0.2)},
    3: {"RATE": (61.5,)},
}

# ecg-rhythm outputs: v1 an irregular (AF-like) strip and an unreadable one; v2 class probabilities.
ECG_OUTPUTS: dict[str, tuple[int, dict[str, tuple[float, ...]]]] = {
    "irregular": (
        1,
        {"SCORE": (99.9,), "RHYTHM_BAND": (1.0,), "FEATURES": (96.8, 16.0, 0.258, 0.362, 1.27)},
    ),
    "unreadable": (1, {"SCORE": (0.0,), "RHYTHM_BAND": (2.0,), "FEATURES": (0.0,) * 5}),
    "classified": (2, {"PROBABILITIES": (0.08, 0.9, 0.02)}),
}


# The chest-opacity CNN's probabilities (no opacity, opacity) for a study with and without one.
IMAGING_OUTPUTS: dict[str, dict[str, tuple[float, ...]]] = {
    "opacity": {"PROBABILITIES": (0.04, 0.96)},
    "clear": {"PROBABILITIES": (0.95, 0.05)},
}


def panel_spec() -> ModelSpec:
    """The fictional panel model's spec, one version per combination of outputs."""
    return parse_spec(panel_model(_PANEL_VERSIONS))


def ecg_lead() -> ModelInput:
    """A 10 s lead II at 250 Hz, as ingest hands the ECG screen its waveform input."""
    return ModelInput(
        name="ecg_lead_ii",
        value=0.0,
        unit="mV",
        observed_at=EFFECTIVE_AT,
        source_reference="Observation/ecg-1",
        samples=(0.0,) * 2500,
        period_ms=4.0,
        duration_s=9.996,
    )


def chest_radiograph() -> ModelInput:
    """One frontal radiograph's claim check, as ingest hands the imaging model its input."""
    return ModelInput(
        name="chest_radiograph",
        value=1.0,
        unit="1",
        observed_at=EFFECTIVE_AT,
        source_reference="ImagingStudy/cxr-1",
        image=ImageReference(
            dicomweb_url="http://127.0.0.1:8242/dicom-web",
            study_uid="2.25.1001",
            series_uid="2.25.1002",
            instance_uid="2.25.1003",
            body_site=BodySiteCoding(
                system="http://snomed.info/sct", code="51185008", display="Thoracic structure"
            ),
        ),
    )


@dataclass(frozen=True)
class ReportCase:
    """One report to build: a spec, a completed inference of it, and the performer shown."""

    spec: ModelSpec
    completed: InferenceCompleted
    performer_display: str | None = None

    @property
    def fhir_version(self) -> FhirVersion:
        """The FHIR version the report is built in (the request's source's)."""
        return self.completed.task.request.source.fhir_version

    def build(self) -> JsonDict:
        """The builder's report for this case."""
        return build_report(
            self.completed, self.spec, performer_display=self.performer_display, issued=ISSUED
        )


def _in(request: RequestInference, fhir_version: FhirVersion) -> RequestInference:
    if fhir_version == "R4B":
        return request
    source = SourceContext(channel="http", fhir_version=fhir_version, site="site-a")
    return request.model_copy(update={"source": source})


def _completed(
    request: RequestInference,
    fhir_version: FhirVersion,
    model_version: int,
    outputs: dict[str, tuple[float, ...]] | None = None,
) -> InferenceCompleted:
    task = make_task(_in(request, fhir_version), model_version=model_version)
    return make_completed(task, outputs=outputs)


@cache
def report_cases() -> dict[str, ReportCase]:
    """Every case by name (``<model>-<variant>-<fhir version>``)."""
    deterioration = load_spec(ROOT / "deploy" / "models" / "deterioration.yaml")
    ecg = load_spec(ROOT / "deploy" / "models" / "ecg-rhythm.yaml")
    panel = panel_spec()
    imaging = load_spec(ROOT / "deploy" / "models" / "chest-opacity.yaml")
    full = make_request(
        encounter_reference="Encounter/enc-1", based_on_reference="ServiceRequest/sr-1"
    )
    cases: dict[str, ReportCase] = {}
    for fhir in FHIR_VERSIONS:
        suffix = fhir.lower()
        for version in (1, 2, 3):
            cases[f"deterioration-v{version}-{suffix}"] = ReportCase(
                deterioration, _completed(full, fhir, version), PERFORMER
            )
        cases[f"deterioration-v1-bare-{suffix}"] = ReportCase(
            deterioration, _completed(make_request(), fhir, 1)
        )
        ecg_request = make_request(model="ecg-rhythm", inputs=(ecg_lead(),))
        for variant, (version, outputs) in ECG_OUTPUTS.items():
            cases[f"ecg-rhythm-{variant}-{suffix}"] = ReportCase(
                ecg, _completed(ecg_request, fhir, version, outputs)
            )
        imaging_request = make_request(model=imaging.name, inputs=(chest_radiograph(),))
        for variant, outputs in IMAGING_OUTPUTS.items():
            cases[f"chest-opacity-{variant}-{suffix}"] = ReportCase(
                imaging, _completed(imaging_request, fhir, 1, outputs), PERFORMER
            )
        panel_request = make_request(model=panel.name)
        for version, outputs in PANEL_OUTPUTS.items():
            cases[f"vitals-panel-v{version}-{suffix}"] = ReportCase(
                panel, _completed(panel_request, fhir, version, outputs), PERFORMER
            )
    return cases
