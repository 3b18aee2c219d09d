"""From validated FHIR resources to readings and orders: what a payload gives each model.

For every patient (Observation subject) and every model spec, each spec input takes the latest
usable reading among the Observations matching any of its sources, converted as the source says.
Extraction only extracts: whether a patient's readings are complete, and whether to ask for a
score, is decided by ``readings.merge`` on the patient's whole state.
Observations give readings, and so does an ImagingStudy to a model with an image input
(``imaging.read_study``: its value is 1, its ``image`` the claim check of the instance the
worker fetches). A ServiceRequest whose code names a model is an explicit order to score its
patient now; one whose ``supportingInfo`` names an ImagingStudy of the same payload and patient
is scored with that study. Patient, Encounter and Endpoint entries matter only as targets of
references; any other resource is ignored. While any deployed model reads images, an
ImagingStudy that none of them can read (no qualifying series, no allowed DICOMweb endpoint)
makes the payload unacceptable, saying why; with no imaging model deployed it causes nothing,
like an Observation no model reads. A reading whose value is
physiologically impossible (``units.implausible``), or not a finite number once converted (a
huge quantity, a waveform whose origin + factor x data overflows), makes the whole payload
unacceptable. A waveform input reads valueSampledData as ``waveforms.read_waveform`` says (R4B
and R5 alike); a signal it calls implausible (``WaveformError.implausible``) rejects the payload
too, any other unreadable one is an error issue and the reading is ignored.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any, Literal, Protocol, TypeVar

from medmesh_contracts.events import ImageReference, ModelInput
from medmesh_contracts.modelspec import UCUM, Coding, InputSource, InputSpec, ModelSpec
from medmesh_ingest.imaging import (
    UNUSABLE_STUDY_STATUSES,
    Endpoints,
    PacsPolicy,
    Refusal,
    read_study,
)
from medmesh_ingest.outcomes import Issue
from medmesh_ingest.units import UnitConversionError, convert, implausible
from medmesh_ingest.validation import ParsedResource
from medmesh_ingest.waveforms import Waveform, WaveformError, read_waveform

# Observations with these statuses carry no reading.
UNUSABLE_STATUSES = frozenset({"entered-in-error", "cancelled"})
# A ServiceRequest coded with this system and a model's name orders that model (as does the code
# of the model's report, from its spec).
MODEL_CODE_SYSTEM = "https://medmesh.dev/fhir/CodeSystem/model"
ORDER_INTENTS = frozenset(
    {"order", "original-order", "reflex-order", "filler-order", "instance-order"}
)

_EARLIEST = datetime.min.replace(tzinfo=UTC)
# No DICOMweb base allowed: every image reading is refused (tests without imaging).
NO_PACS = PacsPolicy()

_T = TypeVar("_T")


@dataclass(frozen=True)
class Reading:
    """One input's reading from a payload, already converted, with its source's version."""

    input: ModelInput
    source_version: str | None = None


@dataclass(frozen=True)
class PatientReadings:
    """The readings a payload gives one model for one patient (possibly not all it needs)."""

    model: str
    subject_reference: str
    encounter_reference: str | None
    readings: Mapping[str, Reading]


@dataclass(frozen=True)
class Order:
    """A ServiceRequest asking for one model's score of one patient now."""

    model: str
    subject_reference: str
    encounter_reference: str | None
    # How the report refers to the order (``ServiceRequest/<id>``), and its version.
    based_on_reference: str
    version: str | None = None
    # Readings the order names (an ImagingStudy in its supportingInfo): scored instead of the
    # patient's latest reading of their inputs.
    pinned: tuple[Reading, ...] = field(default=())

    @property
    def key(self) -> str:
        """The order's identity for deduplication: reference and version."""
        return f"{self.based_on_reference}|{self.version or ''}"


@dataclass(frozen=True)
class Extraction:
    """What a payload gives each model: readings, orders, and issues met.

    ``readings`` holds every (patient, model) with at least one reading, for the per-patient
    state; ``rejections`` holds errors that make the payload unacceptable (impossible values).
    """

    issues: tuple[Issue, ...]
    readings: tuple[PatientReadings, ...] = ()
    orders: tuple[Order, ...] = ()
    rejections: tuple[Issue, ...] = ()


@dataclass(frozen=True)
class _Reading:
    """One usable value for one input, taken from one Observation."""

    value: float
    observed_at: datetime | None
    source_reference: str | None
    encounter_reference: str | None
    version: str | None = None
    # A waveform reading's samples (``value`` is then its last sample; see ModelInput).
    samples: tuple[float, ...] | None = None
    period_ms: float | None = None
    duration_s: float | None = None
    # An image reading's claim check (``value`` is then 1).
    image: ImageReference | None = None

    @property
    def recency(self) -> tuple[bool, datetime]:
        """Sort key: timed readings beat untimed ones, later beats earlier."""
        return (self.observed_at is not None, self.observed_at or _EARLIEST)


class _UnusableValueError(Exception):
    """A matching Observation whose value cannot be read as the source says."""

    def __init__(self, issue: Issue, *, rejects_payload: bool = False) -> None:
        super().__init__(issue.diagnostics)
        self.issue = issue
        self.rejects_payload = rejects_payload


def extract(
    resources: Sequence[ParsedResource],
    specs: Mapping[str, ModelSpec],
    pacs: PacsPolicy = NO_PACS,
) -> Extraction:
    """The readings of every (patient, model) pair the resources give readings for, the orders
    they carry, and the issues met. ``pacs``: the DICOMweb bases image readings may name."""
    by_subject, issues = _observations_by_subject(resources)
    studies = _study_readings(resources, specs, pacs)
    issues.extend(studies.issues)
    found: list[PatientReadings] = []
    rejections: list[Issue] = list(studies.rejections)
    for subject in dict.fromkeys([*by_subject, *studies.by_subject]):
        for spec in specs.values():
            readings, problems, impossible = _readings_for(spec, by_subject.get(subject, ()))
            issues.extend(problems)
            rejections.extend(impossible)
            for name, images in studies.by_subject.get(subject, {}).get(spec.name, {}).items():
                readings[name] = _latest(images)
            if not readings:
                continue
            found.append(
                PatientReadings(
                    spec.name,
                    subject,
                    _encounter_of(list(readings.values())),
                    {
                        i.name: Reading(_model_input(i, readings[i.name]), readings[i.name].version)
                        for i in spec.inputs
                        if i.name in readings
                    },
                )
            )
    orders, order_issues = _orders(resources, specs, studies)
    return Extraction(
        tuple(dict.fromkeys([*issues, *order_issues])),
        tuple(found),
        orders,
        tuple(dict.fromkeys(rejections)),
    )


# --- orders ------------------------------------------------------------------------------------


def _orders(
    resources: Iterable[ParsedResource], specs: Mapping[str, ModelSpec], studies: _Studies
) -> tuple[tuple[Order, ...], list[Issue]]:
    """ServiceRequests whose code names a deployed model: explicit orders to score now."""
    orders: list[Order] = []
    issues: list[Issue] = []
    for resource in resources:
        if resource.resource_type != "ServiceRequest":
            continue
        request = resource.resource
        models = [s.name for s in specs.values() if _orders_model(request.code, s)]
        if not models:
            continue
        path = resource.expression
        if request.status != "active" or request.intent not in ORDER_INTENTS:
            issues.append(
                Issue(
                    "information",
                    "informational",
                    f"{path}: not an active order (status {request.status}, intent "
                    f"{request.intent}); no score was requested for it.",
                    (path,),
                )
            )
            continue
        reference = resource.reference
        if resource.subject_reference is None or reference is None:
            where = f"{path}.subject" if resource.subject_reference is None else f"{path}.id"
            issues.append(
                Issue(
                    "warning",
                    "incomplete",
                    f"{where}: an order needs a literal Patient subject and an id; it is ignored.",
                    (where,),
                )
            )
            continue
        version = request.meta.versionId if request.meta is not None else None
        named = _supporting_studies(resource, studies, issues)
        orders.extend(
            Order(
                m,
                resource.subject_reference,
                resource.encounter_reference,
                reference,
                version,
                _pinned(_inputs_by_name(specs[m]), m, named, studies),
            )
            for m in models
        )
    return tuple(orders), issues


def _inputs_by_name(spec: ModelSpec) -> dict[str, InputSpec]:
    """The spec's inputs by name."""
    return {i.name: i for i in spec.inputs}


def _supporting_studies(order: ParsedResource, studies: _Studies, issues: list[Issue]) -> list[str]:
    """The ImagingStudies of the payload the order's supportingInfo names, of its patient (in
    order); a study of another patient is never scored for this one."""
    named: list[str] = []
    for i, info in enumerate(order.resource.supportingInfo or ()):
        # R4B: a Reference; R5: a CodeableReference.
        target = getattr(info, "reference", None)
        literal = getattr(target, "reference", target) if target is not None else None
        if not isinstance(literal, str):
            continue
        key = studies.keys.get(literal)
        if key is None:
            continue
        if studies.subjects.get(key) != order.subject_reference:
            path = f"{order.expression}.supportingInfo[{i}]"
            issues.append(
                Issue(
                    "warning",
                    "business-rule",
                    f"{path}: names an ImagingStudy of another patient; it is not used.",
                    (path,),
                )
            )
            continue
        named.append(key)
    return named


def _pinned(
    inputs: Mapping[str, InputSpec], model: str, named: Sequence[str], studies: _Studies
) -> tuple[Reading, ...]:
    """The readings the named studies give the model (per input, the first study that gives
    one)."""
    pinned: dict[str, Reading] = {}
    for key in named:
        for name, reading in studies.by_study.get(key, {}).get(model, {}).items():
            if name not in pinned:
                pinned[name] = Reading(_model_input(inputs[name], reading), reading.version)
    return tuple(pinned.values())


def _orders_model(code: Any, spec: ModelSpec) -> bool:
    # R4B codes a ServiceRequest with a CodeableConcept, R5 with a CodeableReference.
    concept = getattr(code, "concept", code)
    if concept is None:
        return False
    by_name = Coding(system=MODEL_CODE_SYSTEM, code=spec.name)
    return _has_coding(concept, by_name) or _has_coding(concept, spec.report.code)


# --- which Observations ------------------------------------------------------------------------


def _observations_by_subject(
    resources: Iterable[ParsedResource],
) -> tuple[dict[str, list[ParsedResource]], list[Issue]]:
    """Usable Observations grouped by patient, in payload order."""
    by_subject: dict[str, list[ParsedResource]] = {}
    issues: list[Issue] = []
    for resource in resources:
        if resource.resource_type != "Observation":
            continue
        if resource.resource.status in UNUSABLE_STATUSES:
            continue
        if resource.subject_reference is None:
            path = f"{resource.expression}.subject"
            issues.append(
                Issue(
                    "warning",
                    "incomplete",
                    f"{path}: no literal Patient reference; the Observation is ignored.",
                    (path,),
                )
            )
            continue
        by_subject.setdefault(resource.subject_reference, []).append(resource)
    return by_subject, issues


# --- one model, one patient --------------------------------------------------------------------


def _readings_for(
    spec: ModelSpec, observations: Sequence[ParsedResource]
) -> tuple[dict[str, _Reading], list[Issue], list[Issue]]:
    """The latest reading of each input the observations give; issues; impossible values."""
    found: dict[str, _Reading] = {}
    issues: list[Issue] = []
    impossible: list[Issue] = []
    for input_spec in spec.inputs:
        reading, problems, rejections = _latest_reading(input_spec, observations)
        issues.extend(problems)
        impossible.extend(rejections)
        if reading is not None:
            found[input_spec.name] = reading
    return found, issues, impossible


# --- imaging studies ---------------------------------------------------------------------------


@dataclass
class _Studies:
    """What the payload's ImagingStudies give: per patient, model and input the image readings
    (in payload order); per study (its key, ``ImagingStudy/<id>`` else its fullUrl) the same and
    its patient; how references name each study; issues and rejections."""

    by_subject: dict[str, dict[str, dict[str, list[_Reading]]]] = field(default_factory=dict)
    by_study: dict[str, dict[str, dict[str, _Reading]]] = field(default_factory=dict)
    subjects: dict[str, str] = field(default_factory=dict)
    keys: dict[str, str] = field(default_factory=dict)
    issues: list[Issue] = field(default_factory=list)
    rejections: list[Issue] = field(default_factory=list)


def _study_readings(
    resources: Sequence[ParsedResource], specs: Mapping[str, ModelSpec], pacs: PacsPolicy
) -> _Studies:
    """The image readings of the payload's ImagingStudies, for every image input of the specs.

    A study that gives no image input a reading, while some are deployed, is refused (the
    payload, or this entry of a batch): the sender learns at once that nothing will read it.
    """
    found = _Studies()
    image_inputs = [(s.name, i) for s in specs.values() for i in s.inputs if i.image is not None]
    studies = [r for r in resources if r.resource_type == "ImagingStudy"]
    if not image_inputs or not studies:
        return found
    endpoints = Endpoints(
        (r.resource, r.full_url) for r in resources if r.resource_type == "Endpoint"
    )
    for study in studies:
        if study.resource.status in UNUSABLE_STUDY_STATUSES:
            continue
        if study.subject_reference is None or study.reference is None:
            # A report must name both the patient and the study it read.
            path, what = (
                (f"{study.expression}.subject", "no literal Patient reference")
                if study.subject_reference is None
                else (f"{study.expression}.id", "neither an id nor a fullUrl to refer to it by")
            )
            found.issues.append(
                Issue(
                    "warning",
                    "incomplete",
                    f"{path}: {what}; the ImagingStudy is ignored.",
                    (path,),
                )
            )
            continue
        refusals: list[tuple[str, str, Refusal]] = []
        readings: dict[str, dict[str, _Reading]] = {}
        for model, input_spec in image_inputs:
            image = read_study(study.resource, study.expression, input_spec, endpoints, pacs)
            if isinstance(image, Refusal):
                refusals.append((model, input_spec.name, image))
                continue
            readings.setdefault(model, {})[input_spec.name] = _image_reading(study, image)
        if not readings:
            found.rejections.extend(
                Issue(
                    "error",
                    "not-supported",
                    f"{r.expression}: model {model} (input {name}) cannot read this study: "
                    f"{r.problem}.",
                    (r.expression,),
                )
                for model, name, r in refusals
            )
            continue
        key = study.reference
        found.by_study[key] = readings
        found.subjects[key] = study.subject_reference
        found.keys.update({ref: key for ref in (key, study.full_url) if ref})
        patient = found.by_subject.setdefault(study.subject_reference, {})
        for model, by_input in readings.items():
            for name, reading in by_input.items():
                patient.setdefault(model, {}).setdefault(name, []).append(reading)
    return found


def _image_reading(study: ParsedResource, image: ImageReference) -> _Reading:
    resource = study.resource
    meta = resource.meta
    return _Reading(
        value=1.0,
        observed_at=as_aware_datetime(resource.started) if resource.started else None,
        source_reference=study.reference,
        encounter_reference=study.encounter_reference,
        version=meta.versionId if meta is not None else None,
        image=image,
    )


class ReadingValues(Protocol):
    """What a reading carries into a model input, in whichever form it is held: a reading of
    this payload (``_Reading``) or one the patient's state kept (``IngestedReading``)."""

    @property
    def value(self) -> float: ...
    @property
    def observed_at(self) -> datetime | None: ...
    @property
    def source_reference(self) -> str | None: ...
    @property
    def samples(self) -> tuple[float, ...] | None: ...
    @property
    def period_ms(self) -> float | None: ...
    @property
    def duration_s(self) -> float | None: ...


def model_input(
    name: str, unit: str, reading: ReadingValues, image: ImageReference | None
) -> ModelInput:
    """The model input ``name`` (in ``unit``) a reading gives: its value, when and from which
    resource it was taken, a waveform's samples and an image's claim check.

    The one place a reading becomes a ModelInput, for a payload's readings and for stored
    ones alike, so a field the contract adds to both reaches every request."""
    return ModelInput(
        name=name,
        value=reading.value,
        unit=unit,
        observed_at=reading.observed_at,
        source_reference=reading.source_reference,
        samples=reading.samples,
        period_ms=reading.period_ms,
        duration_s=reading.duration_s,
        image=image,
    )


def _model_input(input_spec: InputSpec, reading: _Reading) -> ModelInput:
    return model_input(input_spec.name, input_spec.unit, reading, reading.image)


def _encounter_of(readings: Sequence[_Reading]) -> str | None:
    """The encounter of the latest reading that names one."""
    with_encounter = [r for r in readings if r.encounter_reference is not None]
    if not with_encounter:
        return None
    return _latest(with_encounter).encounter_reference


def _latest(readings: Sequence[_Reading]) -> _Reading:
    """The latest reading; on a tie, the one that comes last in the payload."""
    latest = readings[0]
    for reading in readings[1:]:
        if reading.recency >= latest.recency:
            latest = reading
    return latest


# --- one input ---------------------------------------------------------------------------------


def _latest_reading(
    input_spec: InputSpec, observations: Sequence[ParsedResource]
) -> tuple[_Reading | None, list[Issue], list[Issue]]:
    """The latest reading across all sources of the input (e.g. oxygen by flow or by FiO2)."""
    readings: list[_Reading] = []
    issues: list[Issue] = []
    rejections: list[Issue] = []
    for observation in observations:
        for source in input_spec.sources:
            for value, path in _matching_values(observation, source):
                try:
                    readings.append(_reading(observation, input_spec, source, value, path))
                except _UnusableValueError as unusable:
                    (rejections if unusable.rejects_payload else issues).append(unusable.issue)
    return (_latest(readings) if readings else None), issues, rejections


def _matching_values(observation: ParsedResource, source: InputSource) -> Iterator[tuple[Any, str]]:
    """The (Observation or component, its FHIRPath) that carry the source's value."""
    resource = observation.resource
    if not _has_coding(resource.code, source.code):
        return
    if source.component is None:
        yield resource, observation.expression
        return
    for i, component in enumerate(resource.component or ()):
        if _has_coding(component.code, source.component):
            yield component, f"{observation.expression}.component[{i}]"


def _has_coding(concept: Any, wanted: Coding) -> bool:
    return concept is not None and any(
        coding.system == wanted.system and coding.code == wanted.code
        for coding in concept.coding or ()
    )


def _reading(
    observation: ParsedResource,
    input_spec: InputSpec,
    source: InputSource,
    element: Any,
    path: str,
) -> _Reading:
    meta = observation.resource.meta
    samples: tuple[float, ...] | None = None
    period_ms: float | None = None
    duration_s: float | None = None
    if source.kind == "waveform":
        waveform = _waveform(input_spec, element, path)
        samples, period_ms, duration_s = waveform.samples, waveform.period_ms, waveform.duration_s
        value = samples[-1]
    else:
        value = _value(input_spec, source, element, path)
    return _Reading(
        value=value,
        observed_at=observed_at(observation.resource),
        source_reference=observation.reference,
        encounter_reference=observation.encounter_reference,
        version=meta.versionId if meta is not None else None,
        samples=samples,
        period_ms=period_ms,
        duration_s=duration_s,
    )


def _waveform(input_spec: InputSpec, element: Any, path: str) -> Waveform:
    """The element's valueSampledData read as the waveform input says."""
    sampled = element.valueSampledData
    if sampled is None:
        raise _unusable("warning", path, "valueSampledData", "no sampled data")
    try:
        return read_waveform(
            sampled, input_spec.unit, _given(input_spec.waveform, "a waveform spec")
        )
    except WaveformError as exc:
        where = f"valueSampledData.{exc.element}"
        if exc.implausible:
            raise _impossible(path, where, exc.problem) from None
        raise _unusable("error", path, where, exc.problem) from None


def _value(input_spec: InputSpec, source: InputSource, element: Any, path: str) -> float:
    """The input value the element (Observation or component) gives, as the source says."""
    if source.kind == "coded":
        return _coded_value(source, element, path)
    if source.kind == "quantity":
        return _quantity_in(element, input_spec.unit, path)
    quantity = _quantity_in(element, _given(source.unit, "an indicator unit"), path)
    return 1.0 if quantity > _given(source.above, "an indicator threshold") else 0.0


def _coded_value(source: InputSource, element: Any, path: str) -> float:
    concept = element.valueCodeableConcept
    if concept is None:
        raise _unusable("warning", path, "valueCodeableConcept", "no coded value")
    for coding in concept.coding or ():
        answer = source.answers.get(f"{coding.system}|{coding.code}")
        if answer is not None:
            return answer
    return _given(source.otherwise, "an 'otherwise' value")


def _quantity_in(element: Any, unit: str, path: str) -> float:
    """The element's valueQuantity converted to ``unit``; the UCUM code, else the unit text."""
    quantity = element.valueQuantity
    if quantity is None:
        raise _unusable("warning", path, "valueQuantity", "no quantity value")
    if quantity.value is None:
        raise _unusable("warning", path, "valueQuantity.value", "no value")
    if quantity.code is not None and quantity.system not in (None, UCUM):
        raise _unusable("error", path, "valueQuantity.system", "the unit is not a UCUM code")
    from_unit = quantity.code if quantity.code is not None else quantity.unit
    where = "valueQuantity.code" if quantity.code is not None else "valueQuantity.unit"
    if from_unit is None:
        raise _unusable("error", path, where, "no unit")
    try:
        value = convert(float(quantity.value), from_unit, unit)
    except UnitConversionError as exc:
        raise _unusable("error", path, where, f"{exc}, expected {unit!r}") from None
    except (ValueError, OverflowError):  # e.g. a value too large for a float
        value = math.inf
    if not math.isfinite(value):  # e.g. 1e308 /s is infinite in /min
        raise _impossible(path, "valueQuantity.value", f"not a finite number in {unit}")
    problem = implausible(value, unit)
    if problem is not None:
        at = f"{path}.valueQuantity.value"
        issue = Issue("error", "value", f"{at}: the reading {problem}.", (at,))
        raise _UnusableValueError(issue, rejects_payload=True)
    return value


def _impossible(path: str, element: str, problem: str) -> _UnusableValueError:
    """An error for a value that cannot be a measurement: the payload is unacceptable (422)."""
    where = f"{path}.{element}"
    issue = Issue("error", "value", f"{where}: {problem}.", (where,))
    return _UnusableValueError(issue, rejects_payload=True)


def _unusable(
    severity: Literal["error", "warning"], path: str, element: str, problem: str
) -> _UnusableValueError:
    """An error for a value we cannot read, a warning for a value that is not there."""
    where = f"{path}.{element}"
    code = "value" if severity == "error" else "incomplete"
    issue = Issue(severity, code, f"{where}: {problem}; the reading is ignored.", (where,))
    return _UnusableValueError(issue)


def _given(value: _T | None, what: str) -> _T:
    """A spec field that ModelSpec validation guarantees for this kind of input or source."""
    if value is None:
        raise ValueError(f"invalid model spec: no {what}")
    return value


# --- time --------------------------------------------------------------------------------------


def observed_at(observation: Any) -> datetime | None:
    """When the reading was taken: effective[x] (a period's end, else start), else ``issued``."""
    period = observation.effectivePeriod
    candidates = (
        observation.effectiveDateTime,
        period.end if period is not None else None,
        period.start if period is not None else None,
        observation.effectiveInstant,
        observation.issued,
    )
    for candidate in candidates:
        if candidate is not None:
            return as_aware_datetime(candidate)
    return None


def as_aware_datetime(value: datetime | date | str) -> datetime:
    """A FHIR dateTime as a timezone-aware datetime; partial dates become their first instant.

    fhir.resources rejects a dateTime that has a time but no timezone, so a naive value only
    comes from a date (``2026-11-23``) or a partial date (``2026``, ``2026-11``): FHIR gives
    those no timezone, and we take them as UTC.
    """
    if isinstance(value, datetime):
        return value if value.tzinfo is not None else value.replace(tzinfo=UTC)
    if isinstance(value, date):
        return datetime(value.year, value.month, value.day, tzinfo=UTC)
    year, _, month = value.partition("-")
    return datetime(int(year), int(month or 1), 1, tzinfo=UTC)
