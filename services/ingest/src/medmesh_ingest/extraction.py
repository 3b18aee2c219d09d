"""From validated FHIR resources to model inputs: which patient can be scored by which model.

For every patient (Observation subject) and every model spec, each spec input takes the latest
usable reading among the Observations matching any of its sources, converted as the source says.
Only Observations are read; Patient and Encounter entries matter only as targets of references,
which validation has already resolved; any other resource is ignored.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any, Literal, TypeVar

from medmesh_contracts.events import ModelInput
from medmesh_contracts.modelspec import UCUM, Coding, InputSource, InputSpec, ModelSpec
from medmesh_ingest.outcomes import Issue
from medmesh_ingest.units import UnitConversionError, convert
from medmesh_ingest.validation import ParsedResource

# Observations with these statuses carry no reading.
UNUSABLE_STATUSES = frozenset({"entered-in-error", "cancelled"})

_EARLIEST = datetime.min.replace(tzinfo=UTC)

_T = TypeVar("_T")


@dataclass(frozen=True)
class PatientInputs:
    """Everything one model needs to score one patient."""

    model: str
    subject_reference: str
    encounter_reference: str | None
    inputs: tuple[ModelInput, ...]
    effective_at: datetime


@dataclass(frozen=True)
class MissingInputs:
    """A patient with some readings for a model, but not all the required ones."""

    model: str
    subject_reference: str
    missing: tuple[str, ...]


@dataclass(frozen=True)
class Extraction:
    """What a payload gives each model: complete inputs, incomplete ones, and issues met."""

    complete: tuple[PatientInputs, ...]
    incomplete: tuple[MissingInputs, ...]
    issues: tuple[Issue, ...]


@dataclass(frozen=True)
class _Reading:
    """One usable value for one input, taken from one Observation."""

    value: float
    observed_at: datetime | None
    source_reference: str | None
    encounter_reference: str | None

    @property
    def recency(self) -> tuple[bool, datetime]:
        """Sort key: timed readings beat untimed ones, later beats earlier."""
        return (self.observed_at is not None, self.observed_at or _EARLIEST)


class _UnusableValueError(Exception):
    """A matching Observation whose value cannot be read as the source says."""

    def __init__(self, issue: Issue) -> None:
        super().__init__(issue.diagnostics)
        self.issue = issue


def extract(
    resources: Sequence[ParsedResource],
    specs: Mapping[str, ModelSpec],
    *,
    received_at: datetime | None = None,
) -> Extraction:
    """The inputs of every (patient, model) pair the resources give readings for.

    ``received_at`` is the ``effective_at`` of inputs none of whose readings has a time
    (default: now).
    """
    by_subject, issues = _observations_by_subject(resources)
    complete: list[PatientInputs] = []
    incomplete: list[MissingInputs] = []
    for subject, patient_observations in by_subject.items():
        for spec in specs.values():
            result, problems = _inputs_for(spec, subject, patient_observations, received_at)
            issues.extend(problems)
            if isinstance(result, PatientInputs):
                complete.append(result)
            elif isinstance(result, MissingInputs):
                incomplete.append(result)
    return Extraction(tuple(complete), tuple(incomplete), tuple(dict.fromkeys(issues)))


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


def _inputs_for(
    spec: ModelSpec,
    subject: str,
    observations: Sequence[ParsedResource],
    received_at: datetime | None,
) -> tuple[PatientInputs | MissingInputs | None, list[Issue]]:
    """The model's inputs for the patient; None when the patient has no reading for any."""
    found: dict[str, _Reading] = {}
    issues: list[Issue] = []
    for input_spec in spec.inputs:
        reading, problems = _latest_reading(input_spec, observations)
        issues.extend(problems)
        if reading is not None:
            found[input_spec.name] = reading
    if not found:
        return None, issues
    missing = tuple(i.name for i in spec.inputs if i.required and i.name not in found)
    if missing:
        return MissingInputs(spec.name, subject, missing), issues
    inputs = tuple(_model_input(i, found.get(i.name)) for i in spec.inputs)
    readings = list(found.values())
    return (
        PatientInputs(
            model=spec.name,
            subject_reference=subject,
            encounter_reference=_encounter_of(readings),
            inputs=inputs,
            effective_at=_effective_at(readings, received_at),
        ),
        issues,
    )


def _model_input(input_spec: InputSpec, reading: _Reading | None) -> ModelInput:
    if reading is None:
        default = _given(input_spec.default, f"a default for {input_spec.name}")
        return ModelInput(name=input_spec.name, value=default, unit=input_spec.unit)
    return ModelInput(
        name=input_spec.name,
        value=reading.value,
        unit=input_spec.unit,
        observed_at=reading.observed_at,
        source_reference=reading.source_reference,
    )


def _effective_at(readings: Sequence[_Reading], received_at: datetime | None) -> datetime:
    times = [r.observed_at for r in readings if r.observed_at is not None]
    if times:
        return max(times)
    return received_at or datetime.now(UTC)


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
) -> tuple[_Reading | None, list[Issue]]:
    """The latest reading across all sources of the input (e.g. oxygen by flow or by FiO2)."""
    readings: list[_Reading] = []
    issues: list[Issue] = []
    for observation in observations:
        for source in input_spec.sources:
            for value, path in _matching_values(observation, source):
                try:
                    readings.append(_reading(observation, input_spec, source, value, path))
                except _UnusableValueError as unusable:
                    issues.append(unusable.issue)
    return (_latest(readings) if readings else None), issues


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
    return _Reading(
        value=_value(input_spec, source, element, path),
        observed_at=observed_at(observation.resource),
        source_reference=observation.reference,
        encounter_reference=observation.encounter_reference,
    )


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
        return convert(float(quantity.value), from_unit, unit)
    except UnitConversionError as exc:
        raise _unusable("error", path, where, f"{exc}, expected {unit!r}") from None


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
