"""Builders of contract events for tests, with defaults for the deterioration model, and the spec
of a fictional panel model covering the output kinds no deployed model uses (``panel_model``).

Every builder takes keyword overrides and otherwise returns a realistic, fixed value (fixed times,
a fixed correlation id), so two calls with the same arguments describe the same clinical request;
only the random ``event_id`` differs, as it does between two deliveries of one request. The default
vital signs score NEWS2 7 (high risk): RR 22, SpO2 95 % on air, 38.4 Cel, SBP 105, HR 112, alert.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from medmesh_contracts.events import (
    InferenceCompleted,
    ModelInput,
    Producer,
    RequestInference,
    RouteDecision,
    RunInference,
    SourceContext,
)

EFFECTIVE_AT = datetime(2026, 11, 23, 8, 30, tzinfo=UTC)
CORRELATION_ID = "0b7e3a52-4c1e-4f3a-9a8d-2f6c7d1e5b90"
SUBJECT = "Patient/example-1"

# (name, value, unit, source reference), in the order of the spec's inputs.
VITAL_SIGNS: tuple[tuple[str, float, str, str | None], ...] = (
    ("respiratory_rate", 22.0, "/min", "Observation/obs-rr-1"),
    ("spo2", 95.0, "%", "Observation/obs-spo2-1"),
    ("supplemental_oxygen", 0.0, "1", None),  # no oxygen reading: the spec's default (air)
    ("temperature", 38.4, "Cel", "Observation/obs-temp-1"),
    ("systolic_bp", 105.0, "mm[Hg]", "Observation/obs-bp-1"),
    ("heart_rate", 112.0, "/min", "Observation/obs-hr-1"),
    ("not_alert", 0.0, "1", "Observation/obs-avpu-1"),
)

# Output tensors of each deterioration version for VITAL_SIGNS (v1 is NEWS2; v2 a probability in %).
DETERIORATION_OUTPUTS: dict[int, dict[str, tuple[float, ...]]] = {
    1: {
        "SCORE": (7.0,),
        "RISK_BAND": (3.0,),
        "CONTRIBUTIONS": (2.0, 1.0, 0.0, 1.0, 1.0, 2.0, 0.0),
    },
    2: {
        "SCORE": (23.4,),
        "RISK_BAND": (2.0,),
        "CONTRIBUTIONS": (0.41, 0.22, 0.0, 0.18, 0.15, 0.37, 0.0),
    },
    # v3, the ONNX gradient-boosted trees: the classifier's probabilities (no, yes).
    3: {"PROBABILITIES": (0.766, 0.234)},
}


def make_inputs(
    values: Mapping[str, float] | None = None,
    *,
    observed_at: datetime = EFFECTIVE_AT,
) -> tuple[ModelInput, ...]:
    """The default vital signs as model inputs; ``values`` replaces some of them by name."""
    values = values or {}
    return tuple(
        ModelInput(
            name=name,
            value=values.get(name, value),
            unit=unit,
            observed_at=observed_at if source else None,
            source_reference=source,
        )
        for name, value, unit, source in VITAL_SIGNS
    )


def make_request(
    *,
    model: str = "deterioration",
    correlation_id: str = CORRELATION_ID,
    subject_reference: str = SUBJECT,
    patient_pseudonym: str = "pseudo-5f2c9e1a",
    encounter_reference: str | None = None,
    based_on_reference: str | None = None,
    inputs: Sequence[ModelInput] | None = None,
    effective_at: datetime = EFFECTIVE_AT,
    channel: Literal["http", "kafka"] = "kafka",
    site: str | None = "site-a",
    source_system: str | None = "ehr-test",
) -> RequestInference:
    """A RequestInference as ingest would publish it."""
    return RequestInference(
        correlation_id=correlation_id,
        producer=Producer(service="ingest", instance="ingest-test"),
        occurred_at=effective_at + timedelta(seconds=2),
        model=model,
        patient_pseudonym=patient_pseudonym,
        subject_reference=subject_reference,
        encounter_reference=encounter_reference,
        based_on_reference=based_on_reference,
        inputs=tuple(inputs) if inputs is not None else make_inputs(),
        effective_at=effective_at,
        received_at=effective_at + timedelta(seconds=1),
        source=SourceContext(channel=channel, site=site, source_system=source_system),
    )


def make_task(
    request: RequestInference | None = None,
    *,
    model_version: int = 1,
    reason: Literal["static-table", "rule", "bucket", "shadow"] = "static-table",
    detail: str = "",
) -> RunInference:
    """A RunInference as the router would send it to one model version's workers."""
    request = request if request is not None else make_request()
    return RunInference(
        correlation_id=request.correlation_id,
        producer=Producer(service="router", instance="router-test"),
        occurred_at=request.occurred_at + timedelta(milliseconds=5),
        model_version=model_version,
        route=RouteDecision(reason=reason, detail=detail),
        routed_at=request.occurred_at + timedelta(milliseconds=5),
        request=request,
    )


def make_completed(
    task: RunInference | None = None,
    *,
    outputs: Mapping[str, Sequence[float]] | None = None,
    triton_model: str | None = None,
    triton_version: str | None = None,
    device_kind: str = "cpu",
    batch_size: int = 1,
    inference_ms: float = 2.6,
) -> InferenceCompleted:
    """An InferenceCompleted as a worker would publish it; outputs default per model version."""
    task = task if task is not None else make_task()
    if outputs is None:
        outputs = DETERIORATION_OUTPUTS[task.model_version]
    completed_at = task.routed_at + timedelta(milliseconds=10)
    return InferenceCompleted(
        correlation_id=task.correlation_id,
        producer=Producer(service="inference", instance="inference-test"),
        occurred_at=completed_at,
        task=task,
        triton_model=triton_model or task.request.model,
        triton_version=triton_version or str(task.model_version),
        outputs={name: tuple(values) for name, values in outputs.items()},
        device_kind=device_kind,
        batch_size=batch_size,
        inference_ms=inference_ms,
        completed_at=completed_at,
    )


# A fictional model that no service names, for the output kinds no deployed model uses: a
# vital-signs panel reader fed heart and respiratory rate (its tensors are declared, never served).
MODEL_OUTPUT = "https://medmesh.dev/fhir/CodeSystem/model-output"
_SCT = "http://snomed.info/sct"
_LOINC = "http://loinc.org"
PANEL_CLASSIFICATION: dict[str, Any] = {
    "kind": "classification",
    "tensor": "CLASS_P",
    "code": {"system": MODEL_OUTPUT, "code": "state", "display": "Physiological state"},
    "classes": [
        {"code": {"system": MODEL_OUTPUT, "code": "calm", "display": "Calm"}},
        {
            "code": {"system": MODEL_OUTPUT, "code": "stressed", "display": "Stressed"},
            "interpretation": "A",
        },
        {"code": {"system": MODEL_OUTPUT, "code": "unknown", "display": "Unknown"}},
    ],
}
PANEL_FINDINGS: dict[str, Any] = {
    "kind": "findings",
    "tensor": "FINDINGS_P",
    "labels": [
        {"code": {"system": _SCT, "code": "3424008", "display": "Tachycardia"}, "threshold": 0.5},
        {"code": {"system": _SCT, "code": "271823003", "display": "Tachypnea"}, "threshold": 0.5},
    ],
}
PANEL_QUANTITY: dict[str, Any] = {
    "kind": "quantity",
    "tensor": "RATE",
    "code": {"system": MODEL_OUTPUT, "code": "predicted-rate", "display": "Predicted rate"},
    "unit": "/min",
}
PANEL_EXPLANATION: dict[str, Any] = {"kind": "explanation", "tensor": "WHY"}
PANEL_ALL_OUTPUTS = (PANEL_CLASSIFICATION, PANEL_FINDINGS, PANEL_QUANTITY, PANEL_EXPLANATION)
# One value per tensor element for a version with every output: a stressed state, tachycardia.
PANEL_VALUES: dict[str, tuple[float, ...]] = {
    "CLASS_P": (0.1, 0.85, 0.05),
    "FINDINGS_P": (0.93, 0.2),
    "RATE": (97.25,),
    "WHY": (0.7, -0.1),
}


def panel_model(versions: Mapping[int, Sequence[Mapping[str, Any]]]) -> dict[str, Any]:
    """The fictional panel model's spec document (not yet parsed), one version per entry of
    ``versions`` with those outputs, each over a Triton output tensor as wide as PANEL_VALUES'.
    A fresh copy each call, so a test may change it."""
    document: dict[str, Any] = {
        "schema": "medmesh.ModelSpec/2",
        "name": "vitals-panel",
        "display": "Vital-signs panel reader (test fixture)",
        "owner": "medmesh tests",
        "inputs": [
            {
                "name": "heart_rate",
                "display": "Heart rate",
                "unit": "/min",
                "sources": [{"code": {"system": _LOINC, "code": "8867-4"}}],
            },
            {
                "name": "respiratory_rate",
                "display": "Respiratory rate",
                "unit": "/min",
                "sources": [{"code": {"system": _LOINC, "code": "9279-1"}}],
            },
        ],
        "versions": [
            {
                "version": number,
                "algorithm": f"test fixture {number}",
                "triton": {
                    "model": "vitals-panel",
                    "version": number,
                    "inputs": [
                        {
                            "name": "X",
                            "shape": [2],
                            "feed": "features",
                            "inputs": ["heart_rate", "respiratory_rate"],
                        }
                    ],
                    "outputs": [
                        {"name": output["tensor"], "shape": [len(PANEL_VALUES[output["tensor"]])]}
                        for output in outputs
                    ],
                },
                "outputs": [dict(output) for output in outputs],
            }
            for number, outputs in versions.items()
        ],
        "report": {
            "code": {"system": MODEL_OUTPUT, "code": "vitals-panel", "display": "Vitals panel"},
            "category": {"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "OTH"},
        },
        "routing": {"weights": {"1": 100}},
    }
    return copy.deepcopy(document)
