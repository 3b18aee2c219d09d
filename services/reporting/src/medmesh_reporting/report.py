"""Build the FHIR report for one completed inference: pure, no I/O (README.md, "Reports").

``build_report`` turns an ``InferenceCompleted`` event and the model's spec into a Bundle of type
``collection`` holding, in order: the DiagnosticReport, its result Observations, the Device that
stands for the AI model version, and a Provenance naming that Device as the author.

Each output of the version (``medmesh_contracts.results`` reads them by kind) gives Observations:
a risk score one (score, band as interpretation), a classification one (the most probable class
as valueCodeableConcept, every class's probability as a component), findings one per label at
or above its threshold (its probability), a quantity one (the value in its UCUM unit). An
explanation becomes components of the headline Observation (the first). The headline decides the
conclusion and conclusionCode.

Every id is derived from the correlation id (uuid5), and every value from the event, the spec and
``issued``, so a redelivered result (with the same ``issued``) yields a byte-identical report.

Written in the FHIR version the source spoke. An R4 (4.0.1) report is the R4B one, labelled R4
(schema header ``fhir.R4+json``): fhir.resources has no R4 models, and the resources of a report
(Bundle, DiagnosticReport, Observation, Device, Provenance) are defined alike in R4 and R4B, as
far as the builder writes them. Compared element by element (names, cardinality, types,
reference targets, required codes) between fhir.resources 6.2.2, generated from R4 4.0.1, and
its R4B models: Bundle, Device and Provenance are identical; DiagnosticReport and Observation
differ only in ``subject``, whose targets R4B widened (R4: Patient, Group, Device, Location),
and a report's subject is the request's Patient. ``validate_report`` checks that narrower R4
rule too.

R4B (and R4) does not let DiagnosticReport.performer be a Device: the model is recorded as a Device that
Observation.device and Provenance.agent.who point at, and the AI output is labelled with the
``AIAST`` security label (AI Transparency on FHIR). Every resource carries a generated XHTML
narrative (narrative.py) that ends with the AI disclaimer, in the label's words.

Valid FHIR by construction, not by a check per report: the conformance suite
(tests/conformance/test_report_validity.py) validates every kind of report the builder makes, in
both FHIR versions, with fhir.resources (``validate_report``), which costs about ten times the
build itself, narratives included (issue 17). What the builder's inputs can still break, the rules of FHIR's primitive types
(an empty string, a code with stray spaces, a system with a space, an integer beyond 32 bits), is
checked on every report (``_check_primitives``).
"""

from __future__ import annotations

import math
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cached_property
from itertools import repeat
from typing import Any

from fhir.resources import bundle as r5_bundle
from fhir.resources import device as r5_device
from fhir.resources import diagnosticreport as r5_diagnosticreport
from fhir.resources import observation as r5_observation
from fhir.resources import provenance as r5_provenance
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.device import Device
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.observation import Observation
from fhir.resources.R4B.provenance import Provenance
from pydantic import ValidationError

from medmesh_contracts import headers
from medmesh_contracts.events import FhirVersion, InferenceCompleted, RequestInference
from medmesh_contracts.modelspec import (
    DATA_ABSENT_REASON,
    UCUM,
    BandSpec,
    Coding,
    ModelSpec,
    RiskScoreOutput,
    VersionSpec,
)
from medmesh_contracts.results import (
    ClassReading,
    FindingsReading,
    OutputError,
    Reading,
    ScoreReading,
    VersionReading,
    read_outputs,
)
from medmesh_reporting import narrative

JsonDict = dict[str, Any]

REPORT_IDENTIFIER_SYSTEM = "https://medmesh.dev/fhir/sid/report"
MODEL_IDENTIFIER_SYSTEM = "https://medmesh.dev/fhir/sid/model"
# The Observation of a report: its identifier is the report's (the correlation id), in its own
# system, so a FHIR server can create it conditionally (see delivery.py).
OBSERVATION_IDENTIFIER_SYSTEM = "https://medmesh.dev/fhir/sid/report-observation"
MODEL_TAG_SYSTEM = "https://medmesh.dev/fhir/CodeSystem/model"
MODEL_VERSION_TAG_SYSTEM = "https://medmesh.dev/fhir/CodeSystem/model-version"
V3_OBSERVATION_VALUE = "http://terminology.hl7.org/CodeSystem/v3-ObservationValue"
V3_INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
PROVENANCE_PARTICIPANT_TYPE = "http://terminology.hl7.org/CodeSystem/provenance-participant-type"
V3_DATA_OPERATION = "http://terminology.hl7.org/CodeSystem/v3-DataOperation"
MODEL_OUTPUT_SYSTEM = "https://medmesh.dev/fhir/CodeSystem/model-output"
# A findings model's negative result: no label reached its threshold (medmesh's own codes: we
# could not verify a SNOMED CT concept for it offline, so none is invented).
FINDINGS_CODE = Coding(system=MODEL_OUTPUT_SYSTEM, code="findings", display="Model findings")
NO_FINDING = Coding(
    system=MODEL_OUTPUT_SYSTEM,
    code="no-finding",
    display="No finding reached its threshold",
)

AIAST: JsonDict = {
    "system": V3_OBSERVATION_VALUE,
    "code": "AIAST",
    "display": "Artificial Intelligence asserted",
}


def ai_disclaimer(model_label: str) -> str:
    """The AI label said to people: the last line of every narrative of a report."""
    return (
        f"{AIAST['display']}: results of the AI model {model_label}, not reviewed by a"
        " clinician. Use them to support clinical judgement, not to replace it."
    )


# Fixed namespace of every report id; changing it changes every id ever issued.
ID_NAMESPACE = uuid.UUID("8f5b6a0e-3c1d-5b7e-9a42-6d0c1e2f7a31")

# Displays of the v3 ObservationInterpretation codes a band may name.
_INTERPRETATION_DISPLAY = {
    "N": "Normal",
    "A": "Abnormal",
    "AA": "Critical abnormal",
    "H": "High",
    "HH": "Critical high",
    "L": "Low",
    "LL": "Critical low",
    "IND": "Indeterminate",
    "POS": "Positive",
    "NEG": "Negative",
}

# Displays of the data-absent-reason codes a band may name (BandSpec.data_absent_reason).
_DATA_ABSENT_DISPLAY = {
    "unknown": "Unknown",
    "asked-unknown": "Asked But Unknown",
    "temp-unknown": "Temporarily Unknown",
    "not-asked": "Not Asked",
    "asked-declined": "Asked But Declined",
    "masked": "Masked",
    "not-applicable": "Not Applicable",
    "unsupported": "Unsupported",
    "as-text": "As Text",
    "error": "Error",
    "not-a-number": "Not a Number (NaN)",
    "negative-infinity": "Negative Infinity (NINF)",
    "positive-infinity": "Positive Infinity (PINF)",
    "not-performed": "Not Performed",
    "not-permitted": "Not Permitted",
}

# The fhir.resources models each report resource is validated with, per FHIR version (by
# validate_report: in the conformance suite, not on the hot path).
_R4B_MODELS: dict[str, Any] = {
    "Bundle": Bundle,
    "DiagnosticReport": DiagnosticReport,
    "Observation": Observation,
    "Device": Device,
    "Provenance": Provenance,
}
_RESOURCE_MODELS: dict[FhirVersion, dict[str, Any]] = {
    # R4 with the R4B models: the module's docstring says why they serve.
    "R4": _R4B_MODELS,
    "R4B": _R4B_MODELS,
    "R5": {
        "Bundle": r5_bundle.Bundle,
        "DiagnosticReport": r5_diagnosticreport.DiagnosticReport,
        "Observation": r5_observation.Observation,
        "Device": r5_device.Device,
        "Provenance": r5_provenance.Provenance,
    },
}
_SCHEMAS: dict[FhirVersion, str] = {
    "R4": headers.FHIR_R4_JSON,
    "R4B": headers.FHIR_R4B_JSON,
    "R5": headers.FHIR_R5_JSON,
}
# R4's subject targets of the report's DiagnosticReport and Observations (R4B widened them).
_R4_SUBJECT_TYPES = ("Patient", "Group", "Device", "Location")
# A literal reference's type: [base/]Type/id[/_history/version] (a urn names none).
_LITERAL_REFERENCE = re.compile(
    r"(?:^|/)(?P<type>[A-Z][A-Za-z]+)/[A-Za-z0-9\-.]{1,64}(?:/_history/[A-Za-z0-9\-.]{1,64})?$"
)


class ReportBuildError(ValueError):
    """The completed inference cannot become a valid report; the message says why."""


@dataclass(frozen=True)
class ReportIds:
    """The ids of one report's resources, all derived from its correlation id."""

    bundle: str
    report: str
    observation: str
    device: str
    provenance: str

    @staticmethod
    def url(resource_id: str) -> str:
        """The Bundle fullUrl (and in-Bundle reference) of a resource id."""
        return f"urn:uuid:{resource_id}"

    def number(self, observation: JsonDict, position: int, correlation_id: str) -> None:
        """Give the report's ``position``-th Observation its id and identifier: the first keeps
        ``observation`` and the correlation id; later ones derive theirs from the position."""
        if position == 0:
            observation["id"] = self.observation
            value = correlation_id
        else:
            observation["id"] = str(
                uuid.uuid5(ID_NAMESPACE, f"{correlation_id}/Observation/{position}")
            )
            value = f"{correlation_id}/{position}"
        observation["identifier"] = [{"system": OBSERVATION_IDENTIFIER_SYSTEM, "value": value}]


def report_ids(correlation_id: str) -> ReportIds:
    """The deterministic resource ids of the report for one correlation id."""

    def derive(suffix: str) -> str:
        return str(uuid.uuid5(ID_NAMESPACE, f"{correlation_id}/{suffix}"))

    return ReportIds(
        bundle=derive("Bundle"),
        report=derive("DiagnosticReport"),
        observation=derive("Observation"),
        device=derive("Device"),
        provenance=derive("Provenance"),
    )


def read_result(completed: InferenceCompleted, spec: ModelSpec) -> VersionReading:
    """Read the version's outputs by kind; ReportBuildError when they do not fit its spec."""
    version = _version_spec(completed, spec)
    try:
        return read_outputs(spec, version, completed.outputs)
    except OutputError as exc:
        raise ReportBuildError(f"model {spec.name!r} v{version.version}: {exc}") from exc


def report_fhir_version(completed: InferenceCompleted) -> FhirVersion:
    """The FHIR version of the report: the one the source spoke (R4B unless it named R4 or R5)."""
    return completed.task.request.source.fhir_version


def report_schema(completed: InferenceCompleted) -> str:
    """The ``medmesh-schema`` header of the report for one result (its FHIR version)."""
    return _SCHEMAS[report_fhir_version(completed)]


def build_report(
    completed: InferenceCompleted,
    spec: ModelSpec,
    *,
    performer_display: str | None = None,
    issued: datetime,
) -> JsonDict:
    """The collection Bundle reporting one completed inference.

    The Bundle is FHIR R4B, R4 when the request's source spoke R4 (the same Bundle), or R5 when
    it spoke R5 (the resources differ only in the Device and the DiagnosticReport's studies). Raises ReportBuildError when the event does not fit the spec or the result is not
    valid FHIR (of the rules its inputs can break: see the module's docstring).
    """
    fhir_version = report_fhir_version(completed)
    parts = _Parts(
        completed=completed,
        spec=spec,
        result=read_result(completed, spec),
        ids=report_ids(completed.correlation_id),
        issued=issued,
        issued_at=_instant(issued, "issued"),
    )
    device = _device_r5(parts) if fhir_version == "R5" else _device(parts)
    resources = [
        _diagnostic_report(parts, performer_display),
        *parts.observations,
        device,
        _provenance(parts),
    ]
    bundle: JsonDict = {
        "resourceType": "Bundle",
        "id": parts.ids.bundle,
        "identifier": {"system": REPORT_IDENTIFIER_SYSTEM, "value": completed.correlation_id},
        "type": "collection",
        "timestamp": parts.issued_at,
        "entry": [{"fullUrl": ReportIds.url(r["id"]), "resource": r} for r in resources],
    }
    _check_primitives(bundle, fhir_version)
    return bundle


# --- resources --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Parts:
    """Everything one report is built from."""

    completed: InferenceCompleted
    spec: ModelSpec
    result: VersionReading
    ids: ReportIds
    issued: datetime
    issued_at: str

    @property
    def version(self) -> VersionSpec:
        return self.result.version

    @cached_property
    def observations(self) -> list[JsonDict]:
        """The result Observations: the headline's first (its id is ``ids.observation``)."""
        found: list[JsonDict] = []
        for index, reading in enumerate(self.result.readings):
            found.extend(_observations(self, reading, headline=index == 0))
        for position, observation in enumerate(found):
            self.ids.number(observation, position, self.completed.correlation_id)
        return found

    @property
    def request(self) -> RequestInference:
        return self.completed.task.request

    @property
    def effective_at(self) -> str:
        return _instant(self.request.effective_at, "effective_at")

    @property
    def model_label(self) -> str:
        """``deterioration v1``: the model version, as people read it."""
        return f"{self.spec.name} v{self.version.version}"

    @cached_property
    def narrative_context(self) -> narrative.Context:
        """What every narrative of the report says (its inputs table is rendered once)."""
        return narrative.Context(
            model_label=self.model_label,
            model_display=self.spec.display,
            algorithm=self.version.algorithm,
            disclaimer=ai_disclaimer(self.model_label),
            inputs=narrative.inputs_table(self.spec, self.request.inputs),
            effective_at=self.request.effective_at,
            issued_at=self.issued,
        )


def _diagnostic_report(parts: _Parts, performer_display: str | None) -> JsonDict:
    request, ids = parts.request, parts.ids
    report: JsonDict = {
        "resourceType": "DiagnosticReport",
        "id": ids.report,
        "meta": _ai_meta(parts),
        "identifier": [
            {"system": REPORT_IDENTIFIER_SYSTEM, "value": parts.completed.correlation_id},
        ],
    }
    if request.based_on_reference:
        report["basedOn"] = [{"reference": request.based_on_reference}]
    report |= {
        "status": "final",
        "category": [{"coding": [_coding(parts.spec.report.category)]}],
        "code": {"coding": [_coding(parts.spec.report.code)]},
        "subject": {"reference": request.subject_reference},
    }
    if request.encounter_reference:
        report["encounter"] = {"reference": request.encounter_reference}
    report |= {"effectiveDateTime": parts.effective_at, "issued": parts.issued_at}
    if performer_display:
        # Display only: R4B forbids a Device here, and the Organization has no resource of ours.
        report["performer"] = [{"type": "Organization", "display": performer_display}]
    report["result"] = [{"reference": ids.url(o["id"])} for o in parts.observations]
    studies = _imaging_studies(request)
    if studies:
        # The studies the model read: R4's and R4B's imagingStudy is R5's study.
        key = "study" if report_fhir_version(parts.completed) == "R5" else "imagingStudy"
        report[key] = [{"reference": r} for r in studies]
    report["conclusion"] = _conclusion(parts)
    concepts = _conclusion_codes(parts.result.headline)
    if concepts:
        report["conclusionCode"] = concepts
    if not report["result"]:
        del report["result"]
    return _with_text(
        report, narrative.report_text(report, parts.observations, parts.narrative_context)
    )


def _conclusion_codes(headline: Reading) -> list[JsonDict]:
    """DiagnosticReport.conclusionCode: the band, the class, or the findings present."""
    if isinstance(headline, ScoreReading):
        return [_band_concept(headline.output, headline.band)]
    if isinstance(headline, ClassReading):
        return [_concept(headline.chosen.code)]
    if isinstance(headline, FindingsReading):
        return [_concept(finding.code) for finding, _ in headline.present]
    return []


def _concept(coding: Coding) -> JsonDict:
    concept: JsonDict = {"coding": [_coding(coding)]}
    if coding.display:
        concept["text"] = coding.display
    return concept


def _band_concept(output: RiskScoreOutput, band: BandSpec) -> JsonDict:
    """The risk band as a concept of the model's own band code system.

    SNOMED CT has NEWS2 score concepts (1104051000000101) but we could not verify concepts for the
    NEWS2 clinical risk categories, so none is invented here.
    """
    return {
        "coding": [{"system": output.band_system, "code": band.code, "display": band.display}],
        "text": band.display,
    }


def _conclusion(parts: _Parts) -> str:
    """One line a clinician reads: the headline result and the model version that produced it.

    A band with a data-absent reason has no score to read: the line says so, after the band
    (e.g. the ECG could not be interpreted).
    """
    headline, model = parts.result.headline, f"(model {parts.model_label})"
    if isinstance(headline, ScoreReading):
        output, band = headline.output, headline.band
        if band.data_absent_reason is not None:
            return f"{band.display}: no result {model}"
        label = output.score.display or output.score.code
        unit = "" if output.unit.startswith("{") else f" {output.unit}"
        score = headline.score
        shown = str(score) if isinstance(score, int) else f"{score:.1f}"
        return f"{label} {shown}{unit}: {band.display} {model}"
    if isinstance(headline, ClassReading):
        chosen = headline.chosen.code
        return f"{chosen.display or chosen.code} (probability {_percent(headline.probabilities[headline.top]):.1f} %) {model}"
    if isinstance(headline, FindingsReading):
        present = [
            f"{f.code.display or f.code.code} ({_percent(p):.1f} %)" for f, p in headline.present
        ]
        if not present:
            return f"No finding reached its threshold {model}"
        return f"Findings: {', '.join(present)} {model}"
    code = headline.output.code
    return f"{code.display or code.code} {headline.quantity:.4g} {headline.output.unit} {model}"


def _percent(probability: float) -> float:
    return round(probability * 100, 4)


def _observations(parts: _Parts, reading: Reading, *, headline: bool) -> list[JsonDict]:
    """The Observations of one output (ids and identifiers are numbered by the caller)."""
    if isinstance(reading, FindingsReading):
        if not reading.present:
            # A negative result is a result too: one Observation saying no label reached its
            # threshold, with every label's probability as a component.
            return [
                _observation(
                    parts,
                    code=[FINDINGS_CODE],
                    value={"valueCodeableConcept": _concept(NO_FINDING)},
                    # v3 NEG: absent "based on the established threshold", which is what the
                    # value says (every label below its threshold); findings present are POS.
                    interpretation=_v3_interpretation("NEG"),
                    components=[
                        {
                            "code": {"coding": [_coding(label.code)]},
                            "valueQuantity": _quantity(_percent(p), "%"),
                        }
                        for label, p in zip(
                            reading.output.labels, reading.probabilities, strict=True
                        )
                    ],
                )
            ]
        return [
            _observation(
                parts,
                code=[finding.code],
                value={"valueQuantity": _quantity(_percent(p), "%")},
                interpretation=_v3_interpretation("POS"),
                components=[],
            )
            for finding, p in reading.present
        ]
    components = _explanation(parts) if headline else []
    if isinstance(reading, ScoreReading):
        output, band = reading.output, reading.band
        absent = band.data_absent_reason
        return [
            _observation(
                parts,
                code=[output.score, *output.extra_score_codings],
                # A "no result" band (e.g. unreadable input): no value, and no range to read it
                # against; and the contributions of no result are not findings either.
                value=_data_absent(absent) if absent else _value(output, reading.score),
                interpretation=_interpretation(output, band),
                reference_range={} if absent else _reference_range(output),
                components=[] if absent else components,
            )
        ]
    if isinstance(reading, ClassReading):
        chosen = reading.chosen
        classes = [
            {
                "code": {
                    "coding": [_coding(c.code)],
                    "text": f"Probability of {c.code.display or c.code.code}",
                },
                "valueQuantity": _quantity(_percent(p), "%"),
            }
            for c, p in zip(reading.output.classes, reading.probabilities, strict=True)
        ]
        return [
            _observation(
                parts,
                code=[reading.output.code],
                value={"valueCodeableConcept": _concept(chosen.code)},
                interpretation=(
                    _v3_interpretation(chosen.interpretation) if chosen.interpretation else None
                ),
                components=classes + components,
            )
        ]
    return [
        _observation(
            parts,
            code=[reading.output.code],
            value={"valueQuantity": _quantity(reading.quantity, reading.output.unit)},
            interpretation=None,
            components=components,
        )
    ]


def _observation(
    parts: _Parts,
    *,
    code: list[Coding],
    value: JsonDict,
    interpretation: JsonDict | None,
    components: list[JsonDict],
    reference_range: JsonDict | None = None,
) -> JsonDict:
    request, ids = parts.request, parts.ids
    observation: JsonDict = {
        "resourceType": "Observation",
        "id": "",
        "meta": _ai_meta(parts),
        "identifier": [],
    }
    if request.based_on_reference:
        observation["basedOn"] = [{"reference": request.based_on_reference}]
    observation |= {
        "status": "final",
        "category": [{"coding": [_coding(parts.spec.report.observation_category)]}],
        "code": {"coding": [_coding(c) for c in code]},
        "subject": {"reference": request.subject_reference},
    }
    if request.encounter_reference:
        observation["encounter"] = {"reference": request.encounter_reference}
    observation |= {"effectiveDateTime": parts.effective_at, "issued": parts.issued_at, **value}
    if interpretation is not None:
        observation["interpretation"] = [interpretation]
    body_sites = _body_sites(request)
    if body_sites:
        observation["bodySite"] = {"coding": body_sites}
    observation |= {
        **(reference_range or {}),
        "method": {"text": parts.version.algorithm},
        "device": {"reference": ids.url(ids.device)},
    }
    derived_from = _source_references(request)
    if derived_from:
        observation["derivedFrom"] = [{"reference": r} for r in derived_from]
    if components:
        observation["component"] = components
    return _with_text(observation, narrative.observation_text(observation, parts.narrative_context))


def _explanation(parts: _Parts) -> list[JsonDict]:
    """The explanation's values as Observation components, each coded by its item."""
    explanation = parts.result.explanation
    if explanation is None:
        return []
    return [
        {
            "code": {"coding": [_coding(item.code)], "text": item.display},
            "valueQuantity": _quantity(value, item.unit),
        }
        for item, value in zip(explanation.items, explanation.values, strict=True)
    ]


def _device(parts: _Parts) -> JsonDict:
    spec, version, ids = parts.spec, parts.version, parts.ids
    card_notes = _card_notes(version)
    text = narrative.device_text(
        parts.narrative_context,
        model_name=spec.name,
        triton_version=str(version.triton.version),
        owner=spec.owner,
        notes=card_notes,
    )
    return {
        "resourceType": "Device",
        "id": ids.device,
        "text": text,
        "identifier": [
            {"system": MODEL_IDENTIFIER_SYSTEM, "value": f"{spec.name}/v{version.version}"},
        ],
        "status": "active",
        "manufacturer": "medmesh",
        "deviceName": [
            {"name": spec.name, "type": "model-name"},
            {"name": spec.display, "type": "user-friendly-name"},
        ],
        "modelNumber": spec.name,
        "type": {"text": "AI model"},
        "version": [
            {"type": {"text": "model version"}, "value": str(version.version)},
            {"type": {"text": "Triton model version"}, "value": str(version.triton.version)},
        ],
        "owner": {"type": "Organization", "display": spec.owner},
        "note": [{"text": n} for n in (version.algorithm, *card_notes)],
    }


def _card_notes(version: VersionSpec) -> list[str]:
    """The model card (intended use, training data, held-out metrics, limitations) as notes."""
    card = version.card
    if card is None:
        return []
    notes = [
        f"Intended use: {card.intended_use}",
        f"Training data: {card.training_data}",
        f"Limitations: {card.limitations}",
    ]
    if card.metrics:
        figures = ", ".join(f"{name} {value:g}" for name, value in card.metrics.items())
        notes.append(f"Held-out metrics: {figures}")
    if card.document:
        notes.append(f"Model card: {card.document}")
    return notes


def _device_r5(parts: _Parts) -> JsonDict:
    """The R5 Device: ``name`` replaces ``deviceName``, and ``type`` is a list."""
    device = _device(parts)
    names = device.pop("deviceName")
    r5_types = {"model-name": "registered-name", "user-friendly-name": "user-friendly-name"}
    device["name"] = [{"value": n["name"], "type": r5_types[n["type"]]} for n in names]
    device["type"] = [device["type"]]
    return {key: device[key] for key in _R5_DEVICE_ORDER if key in device}


_R5_DEVICE_ORDER = (
    "resourceType",
    "id",
    "text",
    "identifier",
    "status",
    "manufacturer",
    "name",
    "modelNumber",
    "type",
    "version",
    "owner",
    "note",
)


def _reference_range(output: RiskScoreOutput) -> JsonDict:
    """Observation.referenceRange: the lowest-risk score range, when the spec gives one."""
    spec_range = output.reference_range
    if spec_range is None:
        return {}
    found: JsonDict = {}
    for bound in ("low", "high"):
        value = getattr(spec_range, bound)
        if value is not None:
            # An infinite bound stays a float for _check_primitives to refuse (int() would raise).
            number = int(value) if output.integer and math.isfinite(value) else value
            found[bound] = _quantity(number, output.unit)
    found["text"] = spec_range.text
    return {"referenceRange": [found]}


def _provenance(parts: _Parts) -> JsonDict:
    ids = parts.ids
    provenance: JsonDict = {
        "resourceType": "Provenance",
        "id": ids.provenance,
        "target": [
            {"reference": ids.url(ids.report)},
            *({"reference": ids.url(o["id"])} for o in parts.observations),
        ],
        "occurredDateTime": _instant(parts.completed.completed_at, "completed_at"),
        "recorded": parts.issued_at,
        "activity": {
            "coding": [{"system": V3_DATA_OPERATION, "code": "CREATE", "display": "create"}]
        },
        "agent": [
            {
                "type": {
                    "coding": [
                        {
                            "system": PROVENANCE_PARTICIPANT_TYPE,
                            "code": "author",
                            "display": "Author",
                        }
                    ]
                },
                "who": {"reference": ids.url(ids.device), "display": parts.model_label},
            }
        ],
    }
    sources = _source_references(parts.request)
    if sources:
        provenance["entity"] = [{"role": "source", "what": {"reference": r}} for r in sources]
    text = narrative.provenance_text(
        parts.narrative_context,
        occurred_at=parts.completed.completed_at,
        results=len(parts.observations),
    )
    return _with_text(provenance, text)


# --- parts ------------------------------------------------------------------------------------


def _ai_meta(parts: _Parts) -> JsonDict:
    spec, version = parts.spec, parts.version
    return {
        "security": [dict(AIAST)],
        "tag": [
            {"system": MODEL_TAG_SYSTEM, "code": spec.name, "display": spec.display},
            {
                "system": MODEL_VERSION_TAG_SYSTEM,
                "code": f"{spec.name}/v{version.version}",
                "display": version.algorithm,
            },
        ],
    }


def _value(output: RiskScoreOutput, score: float | int) -> JsonDict:
    if output.integer:
        return {"valueInteger": score}
    return {"valueQuantity": _quantity(score, output.unit)}


def _data_absent(code: str) -> JsonDict:
    """Observation.dataAbsentReason, in place of value[x], for a band with no result."""
    coding: JsonDict = {"system": DATA_ABSENT_REASON, "code": code}
    display = _DATA_ABSENT_DISPLAY.get(code)
    if display:
        coding["display"] = display
    return {"dataAbsentReason": {"coding": [coding]}}


def _quantity(value: float | int, ucum_code: str) -> JsonDict:
    return {"value": value, "unit": ucum_code, "system": UCUM, "code": ucum_code}


def _v3_coding(code: str) -> JsonDict:
    v3: JsonDict = {"system": V3_INTERPRETATION, "code": code}
    display = _INTERPRETATION_DISPLAY.get(code)
    if display:
        v3["display"] = display
    return v3


def _v3_interpretation(code: str) -> JsonDict:
    concept: JsonDict = {"coding": [_v3_coding(code)]}
    display = _INTERPRETATION_DISPLAY.get(code)
    if display:
        concept["text"] = display
    return concept


def _interpretation(output: RiskScoreOutput, band: BandSpec) -> JsonDict:
    return {
        "coding": [
            _v3_coding(band.interpretation),
            {"system": output.band_system, "code": band.code, "display": band.display},
        ],
        "text": band.display,
    }


def _coding(coding: Coding) -> JsonDict:
    out: JsonDict = {"system": coding.system, "code": coding.code}
    if coding.display:
        out["display"] = coding.display
    return out


def _source_references(request: RequestInference) -> list[str]:
    """The distinct source references of the request's inputs, in input order.

    A ``urn:uuid:`` reference named a resource inside the sender's Bundle only: outside it (in
    our report Bundle, or on the hospital's server) it resolves to nothing, so it is left out.
    """
    refs = (
        i.source_reference
        for i in request.inputs
        if i.source_reference and not i.source_reference.startswith("urn:")
    )
    return list(dict.fromkeys(refs))


def _imaging_studies(request: RequestInference) -> list[str]:
    """The ImagingStudy references of the request's image inputs, once each."""
    return list(
        dict.fromkeys(
            i.source_reference
            for i in request.inputs
            if i.image is not None
            and i.source_reference
            and i.source_reference.startswith("ImagingStudy/")
        )
    )


def _body_sites(request: RequestInference) -> list[JsonDict]:
    """The anatomy the request's images show, as their series coded it, once each."""
    sites = dict.fromkeys(
        i.image.body_site for i in request.inputs if i.image is not None and i.image.body_site
    )
    return [site.model_dump(exclude_none=True) for site in sites if site is not None]


def _instant(moment: datetime, what: str) -> str:
    """An aware datetime as a FHIR instant in UTC (``...Z``); ReportBuildError when naive."""
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ReportBuildError(f"{what} must be timezone-aware, got {moment.isoformat()}")
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _version_spec(completed: InferenceCompleted, spec: ModelSpec) -> VersionSpec:
    model = completed.task.request.model
    if model != spec.name:
        raise ReportBuildError(f"result of model {model!r} given the spec of {spec.name!r}")
    try:
        return spec.version(completed.task.model_version)
    except KeyError as exc:
        raise ReportBuildError(str(exc.args[0])) from exc


def _with_text(resource: JsonDict, text: JsonDict) -> JsonDict:
    """The resource with its narrative where FHIR's JSON form puts it: after id and meta."""
    head = {key: resource[key] for key in ("resourceType", "id", "meta") if key in resource}
    return head | {"text": text} | resource


# --- validity ---------------------------------------------------------------------------------

# The syntax of FHIR's code and uri (Coding.system) primitives, by the JSON key that holds one in
# a report. The uri's is FHIR's (no whitespace): fhir.resources does not anchor it, so it lets a
# space through that a FHIR server refuses.
_SYNTAX_BY_KEY = {
    "code": (re.compile(r"[^\s]+(\s[^\s]+)*"), "is not a FHIR code (whitespace)"),
    "system": (re.compile(r"\S+"), "is not a FHIR uri (whitespace)"),
}
_FHIR_INTEGER = range(-(2**31), 2**31)


def _check_primitives(bundle: JsonDict, fhir_version: FhirVersion) -> None:
    """ReportBuildError when a value breaks a rule of its FHIR primitive type that the builder's
    inputs can break: every string non-empty, codes and systems without stray whitespace,
    decimals finite, integers within 32 bits. The message names the element, never its value
    (which may be patient data)."""
    if _primitives_hold(bundle):
        return
    rule, path = _bad_primitive(bundle, "") or ("breaks a primitive rule", [])
    where = "Bundle" + "".join(reversed(path))
    raise ReportBuildError(f"the report is not valid FHIR {fhir_version}: {where} {rule}")


def _primitives_hold(bundle: JsonDict) -> bool:
    """Whether no value of the Bundle breaks its primitive rule (``_broken_rule``): the fast
    pass of every report (a loop, no paths); ``_bad_primitive`` then says where."""
    stack: list[tuple[str, Any]] = [("", bundle)]
    while stack:
        key, node = stack.pop()
        pairs = node.items() if type(node) is dict else zip(repeat(key), node)
        for child_key, child in pairs:
            kind = type(child)
            if kind is str:
                # Most values are non-empty strings under keys with no syntax: no call for those.
                if child and child_key not in _SYNTAX_BY_KEY:
                    continue
            elif kind is dict or kind is list:
                stack.append((child_key, child))
                continue
            if _broken_rule(child, child_key) is not None:
                return False
    return True


def _bad_primitive(node: Any, key: str) -> tuple[str, list[str]] | None:
    """The first primitive under ``node`` (the value of ``key``) that breaks its rule: the rule,
    and the path to it from ``node``, innermost step first; None when all hold."""
    if isinstance(node, dict):
        for child_key, child in node.items():
            found = _bad_primitive(child, child_key)
            if found is not None:
                found[1].append(f".{child_key}")
                return found
    elif isinstance(node, list):
        for index, child in enumerate(node):
            found = _bad_primitive(child, key)
            if found is not None:
                found[1].append(f"[{index}]")
                return found
    else:
        rule = _broken_rule(node, key)
        if rule is not None:
            return rule, []
    return None


def _broken_rule(value: Any, key: str) -> str | None:
    """The primitive rule a JSON value held by ``key`` breaks, or None."""
    if isinstance(value, str):
        syntax = _SYNTAX_BY_KEY.get(key)
        if not value:
            return "is an empty string"
        if syntax is not None and not syntax[0].fullmatch(value):
            return syntax[1]
    elif isinstance(value, float):
        if not math.isfinite(value):
            return "is not a finite number"
    elif key == "valueInteger" and isinstance(value, int) and value not in _FHIR_INTEGER:
        return "is beyond a FHIR integer (32 bits)"
    return None


def validate_report(bundle: JsonDict, fhir_version: FhirVersion) -> None:
    """Validate each resource of a report with its fhir.resources model of the FHIR version, then
    the whole Bundle; ReportBuildError naming what is invalid (never the values) when one is not.

    The conformance suite's proof that the builder makes valid FHIR; too slow to run per report.
    """
    models = _RESOURCE_MODELS[fhir_version]
    try:
        for entry in bundle["entry"]:
            resource = entry["resource"]
            models[resource["resourceType"]].model_validate(resource)
        models["Bundle"].model_validate(bundle)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False)
        where = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors)
        raise ReportBuildError(f"the report is not valid FHIR {fhir_version}: {where}") from exc
    if fhir_version == "R4":
        _check_r4_subjects(bundle)


def _check_r4_subjects(bundle: JsonDict) -> None:
    """ReportBuildError when a DiagnosticReport's or Observation's subject targets a type R4
    does not allow there (the R4B models allow more: the module's docstring)."""
    for index, entry in enumerate(bundle["entry"]):
        resource = entry["resource"]
        if resource["resourceType"] not in ("DiagnosticReport", "Observation"):
            continue
        reference = str((resource.get("subject") or {}).get("reference") or "")
        match = _LITERAL_REFERENCE.search(reference)
        target = match["type"] if match else None
        if target is not None and target not in _R4_SUBJECT_TYPES:
            raise ReportBuildError(
                f"the report is not valid FHIR R4: Bundle.entry[{index}].resource.subject "
                f"targets a {target}, not one of {', '.join(_R4_SUBJECT_TYPES)}"
            )
