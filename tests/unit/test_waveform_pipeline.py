"""A waveform model through the spec-driven worker and reporting code (no name special cases):
the worker's tensor rows, the report's components from the spec's contributions, and the
producers' compression."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiokafka import codec

from medmesh_cli.reports import summarize
from medmesh_contracts.events import ModelInput, SourceContext
from medmesh_contracts.modelspec import BandSpec, ModelSpec, RiskScoreOutput, load_spec
from medmesh_inference.tensors import TaskInputError, input_batch, input_rows
from medmesh_reporting.report import ReportBuildError, build_report
from medmesh_runtime.kafka import compression_type
from medmesh_runtime.settings import ServiceSettings
from tests.conformance.report_checks import check_report_bundle
from tests.factories import EFFECTIVE_AT, make_completed, make_request, make_task

ROOT = Path(__file__).resolve().parents[2]
ISSUED = datetime(2026, 11, 23, 15, 0, 5, tzinfo=UTC)
# Outputs of ecg-rhythm v1 for an AF-like strip: score %, band, FEATURES.
AF_OUTPUTS = {
    "SCORE": (99.9,),
    "RHYTHM_BAND": (1.0,),
    "FEATURES": (96.8, 16.0, 0.258, 0.362, 1.27),
}


@pytest.fixture(scope="module")
def spec() -> ModelSpec:
    """The ecg-rhythm model spec."""
    return load_spec(ROOT / "deploy" / "models" / "ecg-rhythm.yaml")


def _lead(count: int | None = 2500, period_ms: float = 4.0, **overrides: Any) -> ModelInput:
    values = None if count is None else tuple(float(np.sin(i / 10)) for i in range(count))
    fields: dict[str, Any] = {
        "name": "ecg_lead_ii",
        "value": values[-1] if values else 0.0,
        "unit": "mV",
        "observed_at": EFFECTIVE_AT,
        "source_reference": "Observation/ecg-1",
        "samples": values,
        "period_ms": period_ms,
        "duration_s": None if count is None else (count - 1) * period_ms / 1000,
    }
    return ModelInput(**(fields | overrides))


def _task(lead: ModelInput, r5: bool = False) -> Any:
    request = make_request(model="ecg-rhythm", inputs=(lead,))
    if r5:
        source = SourceContext(channel="http", fhir_version="R5")
        request = request.model_copy(update={"source": source})
    return make_task(request)


def test_waveform_input_fills_the_row_with_its_samples(spec: ModelSpec) -> None:
    """A waveform input gives a 2500-column row; three tasks stack to an FP32 [3, 2500] tensor."""
    lead = _lead()
    version = spec.version(1)
    rows = input_rows(_task(lead), spec, version)
    row = rows["ECG"]
    assert len(row) == version.triton.inputs[0].elements == 2500
    assert row[:3] == list(lead.samples or ())[:3]
    batch = input_batch(version, [rows, rows, rows])["ECG"]
    assert batch.shape == (3, 2500)
    assert batch.dtype == np.float32


@pytest.mark.parametrize(
    ("lead", "message"),
    [
        (_lead(count=2499), "has 2499 samples, the model expects 2500"),
        (_lead(period_ms=2.0), "sampled every 2.0 ms, the model expects 4 ms"),
        (_lead(count=None), "carries no samples"),
        (_lead(unit="uV"), "is in 'uV'"),
    ],
    ids=["length", "rate", "no-samples", "unit"],
)
def test_waveform_that_does_not_fit_is_a_task_input_error(
    spec: ModelSpec, lead: ModelInput, message: str
) -> None:
    """A waveform of another length, rate or unit, or without samples, is never sent to Triton."""
    with pytest.raises(TaskInputError, match=message):
        input_rows(_task(lead), spec, spec.version(1))


def test_non_finite_sample_is_a_task_input_error(spec: ModelSpec) -> None:
    """A NaN among the samples is refused before Triton."""
    samples = list(_lead().samples or ())
    samples[7] = float("nan")
    with pytest.raises(TaskInputError, match="not a finite number"):
        input_rows(_task(_lead(samples=tuple(samples))), spec, spec.version(1))


def _bands(spec: ModelSpec) -> dict[int, BandSpec]:
    """The v1 risk score's bands by index."""
    headline = spec.version(1).headline
    assert isinstance(headline, RiskScoreOutput)
    return {b.index: b for b in headline.bands}


@pytest.mark.parametrize("r5", [False, True], ids=["R4B", "R5"])
def test_ecg_report_components_are_the_spec_contributions(spec: ModelSpec, r5: bool) -> None:
    """The report codes the ECG screen with the spec's report code, score, band and one
    component per listed contribution (heart rate as LOINC 8867-4 in /min), and conforms."""
    completed = make_completed(_task(_lead(), r5), outputs=AF_OUTPUTS)
    bundle = build_report(completed, spec, issued=ISSUED)
    assert check_report_bundle(bundle) == []
    by_type = {e["resource"]["resourceType"]: e["resource"] for e in bundle["entry"]}
    report, observation = by_type["DiagnosticReport"], by_type["Observation"]
    assert report["code"]["coding"][0]["code"] == "ecg-rhythm-screen"
    assert report["category"][0]["coding"][0]["code"] == "EC"
    assert observation["category"][0]["coding"][0]["code"] == "procedure"
    assert report["conclusionCode"][0]["coding"][0]["code"] == "irregular"
    assert observation["valueQuantity"] == {
        "value": 99.9,
        "unit": "%",
        "system": "http://unitsofmeasure.org",
        "code": "%",
    }
    components = [
        (c["code"]["coding"][0]["code"], c["valueQuantity"]["code"], c["valueQuantity"]["value"])
        for c in observation["component"]
    ]
    assert components == [
        ("8867-4", "/min", 96.8),
        ("r-peaks-detected", "{beats}", 16.0),
        ("rr-cv", "1", 0.258),
        ("rr-nrmssd", "1", 0.362),
        ("rr-turning-point-ratio", "1", 1.27),
    ]
    assert observation["derivedFrom"] == [{"reference": "Observation/ecg-1"}]


@pytest.mark.parametrize("r5", [False, True], ids=["R4B", "R5"])
def test_unreadable_ecg_is_reported_without_a_value(spec: ModelSpec, r5: bool) -> None:
    """An unreadable ECG (band 2, IND) has dataAbsentReason 'error', no score, no components."""
    outputs = {"SCORE": (0.0,), "RHYTHM_BAND": (2.0,), "FEATURES": (0.0, 3.0, 0.0, 0.0, 0.0)}
    completed = make_completed(_task(_lead(), r5), outputs=outputs)
    bundle = build_report(completed, spec, issued=ISSUED)
    assert check_report_bundle(bundle, fhir_version="R5" if r5 else "R4B") == []
    report, observation = (bundle["entry"][i]["resource"] for i in (0, 1))
    codings = observation["interpretation"][0]["coding"]
    assert [(c["code"], c.get("display")) for c in codings] == [
        ("IND", "Indeterminate"),
        ("unreadable", _bands(spec)[2].display),
    ]
    assert not [key for key in observation if key.startswith("value")]
    (reason,) = observation["dataAbsentReason"]["coding"]
    assert (reason["system"], reason["code"]) == (
        "http://terminology.hl7.org/CodeSystem/data-absent-reason",
        "error",
    )
    assert "component" not in observation
    assert "referenceRange" not in observation
    assert observation["category"][0]["coding"][0]["code"] == "procedure"
    assert report["conclusion"].startswith("ECG not interpretable")
    assert report["conclusion"].endswith(": no result (model ecg-rhythm v1)")
    assert "0.0" not in report["conclusion"]
    assert report["conclusionCode"][0]["coding"][0]["code"] == "unreadable"


def test_contributions_of_another_width_are_refused(spec: ModelSpec) -> None:
    """FEATURES with one value per input (1) instead of the 5 the spec lists is refused."""
    outputs = AF_OUTPUTS | {"FEATURES": (1.0,)}
    with pytest.raises(ReportBuildError, match="FEATURES has 1 values a row, the spec declares 5"):
        build_report(make_completed(_task(_lead()), outputs=outputs), spec, issued=ISSUED)


def test_producers_compress_with_lz4_by_default_and_it_is_available() -> None:
    """MEDMESH_KAFKA_COMPRESSION defaults to lz4 (its codec installed); 'none' turns it off."""
    assert compression_type(ServiceSettings()) == "lz4"
    assert compression_type(ServiceSettings(kafka_compression="none")) is None
    assert codec.has_lz4()
    assert codec.has_zstd()
    payload = b'{"samples": [0.1, 0.2, 0.1, 0.2]}' * 100
    assert codec.lz4_decode(codec.lz4_encode(payload)) == payload


def test_report_summary_of_an_unreadable_ecg_has_no_score(spec: ModelSpec) -> None:
    """The CLI's report summary gives no score for a report without a value, and its band."""
    outputs = {"SCORE": (0.0,), "RHYTHM_BAND": (2.0,), "FEATURES": (0.0, 3.0, 0.0, 0.0, 0.0)}
    bundle = build_report(make_completed(_task(_lead()), outputs=outputs), spec, issued=ISSUED)
    summary = summarize(b"p", json.dumps(bundle).encode(), {})
    assert (summary.score, summary.score_unit, summary.band) == (None, "", "unreadable")


def test_a_sample_beyond_the_fp32_range_is_a_task_input_error(spec: ModelSpec) -> None:
    """1e300 mV is finite as a float64 but inf in the FP32 tensor: refused before Triton."""
    samples = list(_lead().samples or ())
    samples[3] = 1e300
    with pytest.raises(TaskInputError, match="beyond the FP32 range"):
        input_rows(_task(_lead(samples=tuple(samples))), spec, spec.version(1))
