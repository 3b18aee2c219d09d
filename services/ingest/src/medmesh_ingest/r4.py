"""FHIR R4 (4.0.1) payloads, read with the R4B (4.3.0) models of fhir.resources.

Why R4B models serve R4: fhir.resources 8 ships R5 and R4B, not R4, and R4B is a technical
correction of R4 that is "strictly backward compatible with R4" outside the medication
definition and evidence-based-medicine resources (R4B ballot introduction,
http://hl7.org/fhir/2021Mar/ballot-intro.html). Compared element by element (names, cardinality,
types, reference targets, required codes) between fhir.resources 6.2.2, generated from R4
4.0.1, and the R4B models used here: Bundle, Patient, Encounter, ServiceRequest, ImagingStudy,
Endpoint, MessageHeader, Parameters, Device, Provenance, OperationOutcome and
CapabilityStatement are identical; Observation and DiagnosticReport differ only in R4B's wider
``subject`` targets (R4B adds Medication, Organization, Practitioner, Procedure, Substance;
ingest requires a Patient there anyway, and reports name a Patient). So an R4 payload of the
resources medmesh reads validates the same against R4B, and an R4B-built report is valid R4.

What R4B's models cannot judge for R4 is refused, naming the type (``unreadable_reason``):

- resource types R4B added (``R4B_ONLY_TYPES``: SubscriptionStatus, SubscriptionTopic,
  ClinicalUseDefinition...) are not R4;
- resource types R4B withdrew (``R4_ONLY_TYPES``: MedicinalProduct..., SubstancePolymer...)
  are R4, but the R4B models do not know them;
- Evidence and EvidenceVariable were redefined in R4B (``REDEFINED_TYPES``).

Subscription notifications: R4 has no SubscriptionStatus; the Subscriptions R5 Backport IG
carries the status in a ``Parameters`` resource first in the ``history`` Bundle (profile
``backport-subscription-status-r4``). ``notification_status`` reads that Parameters into the
same fields ingest reads of an R4B SubscriptionStatus.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from medmesh_ingest.outcomes import Issue

# Resource types added in R4B 4.3.0: none exists in R4.
R4B_ONLY_TYPES = frozenset(
    {
        "AdministrableProductDefinition",
        "Citation",
        "ClinicalUseDefinition",
        "EvidenceReport",
        "Ingredient",
        "ManufacturedItemDefinition",
        "MedicinalProductDefinition",
        "NutritionProduct",
        "PackagedProductDefinition",
        "RegulatedAuthorization",
        "SubscriptionStatus",
        "SubscriptionTopic",
        "SubstanceDefinition",
    }
)
# R4 resource types R4B withdrew (replaced by the *Definition resources above).
R4_ONLY_TYPES = frozenset(
    {
        "EffectEvidenceSynthesis",
        "MedicinalProduct",
        "MedicinalProductAuthorization",
        "MedicinalProductContraindication",
        "MedicinalProductIndication",
        "MedicinalProductIngredient",
        "MedicinalProductInteraction",
        "MedicinalProductManufactured",
        "MedicinalProductPackaged",
        "MedicinalProductPharmaceutical",
        "MedicinalProductUndesirableEffect",
        "RiskEvidenceSynthesis",
        "SubstanceNucleicAcid",
        "SubstancePolymer",
        "SubstanceProtein",
        "SubstanceReferenceInformation",
        "SubstanceSourceMaterial",
        "SubstanceSpecification",
    }
)
# Resource types of both whose elements R4B redefined: R4B's models would misjudge R4 ones.
REDEFINED_TYPES = frozenset({"Evidence", "EvidenceVariable"})

STATUS_PROFILE = (
    "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/"
    "backport-subscription-status-r4"
)


def unreadable_reason(name: str) -> str | None:
    """Why ingest cannot read a resource of type ``name`` sent as R4; None: it can."""
    if name in R4B_ONLY_TYPES:
        return (
            f"{name} is not an R4 (4.0.1) resource type: it came in R4B (4.3.0); send it as "
            "R4B (fhirVersion=4.3) or R5 (fhirVersion=5.0)"
        )
    if name in R4_ONLY_TYPES:
        return (
            f"{name} is an R4 resource type ingest cannot read: R4 is validated with R4B's "
            "definitions, which withdrew it"
        )
    if name in REDEFINED_TYPES:
        return (
            f"{name} is defined differently in R4 and R4B, and ingest validates R4 with R4B's "
            f"definitions: it cannot read an R4 {name}"
        )
    return None


# Where the event counters sit in the status Parameters (to name them in an issue).
EVENTS_SINCE_START_PATH = "parameter.where(name = 'events-since-subscription-start').valueString"


def event_number_path(index: int) -> str:
    """The FHIRPath of the ``index``-th notification-event's event-number."""
    return (
        f"parameter.where(name = 'notification-event')[{index}]"
        ".part.where(name = 'event-number').valueString"
    )


@dataclass(frozen=True)
class NotificationEvent:
    """One ``notification-event`` of the status: its focus reference and its event number
    (a string, as the profile has it), if any."""

    focus: str | None
    number: str | None = None


@dataclass(frozen=True)
class NotificationStatus:
    """What ingest reads of a notification's status, whichever resource carried it."""

    type: str | None
    events: tuple[NotificationEvent, ...]
    subscription: str | None = None
    events_since_start: str | None = None


def notification_status(parameters: Any, expression: str) -> tuple[NotificationStatus, list[Issue]]:
    """The status an R4 backport ``Parameters`` carries, and the issues found reading it.

    ``type`` is the ``type`` parameter's valueCode (``handshake``, ``heartbeat``,
    ``event-notification``...); each ``notification-event`` part's ``focus`` valueReference
    names a resource the notification is about. The profile requires ``subscription`` (a
    valueReference) and ``type``; ``status``, ``topic`` and ``events-since-subscription-start``
    are read for the event counters (``subscriptions.py``).
    """
    issues: list[Issue] = []
    kind: str | None = None
    events: list[NotificationEvent] = []
    subscription: str | None = None
    since_start: str | None = None
    for i, parameter in enumerate(parameters.parameter or ()):
        where = f"{expression}.parameter[{i}]"
        if parameter.name == "type":
            kind = parameter.valueCode
            if kind is None:
                issues.append(_issue(f"{where}.valueCode", "is required in the type parameter"))
        elif parameter.name == "subscription":
            if parameter.valueReference is None:
                issues.append(
                    _issue(f"{where}.valueReference", "is required in the subscription parameter")
                )
            else:
                subscription = parameter.valueReference.reference
        elif parameter.name == "events-since-subscription-start":
            since_start = _count(parameter)
        elif parameter.name == "notification-event":
            events.append(NotificationEvent(_focus(parameter), _event_number(parameter)))
    names = {parameter.name for parameter in parameters.parameter or ()}
    for required in ("subscription", "type"):
        if required not in names:
            issues.append(_issue(f"{expression}.parameter", f"needs a {required} parameter"))
    return NotificationStatus(kind, tuple(events), subscription, since_start), issues


def _count(parameter: Any) -> str | None:
    """A counter's value: the profile types it string (integer64 has no R4 type); an R4 sender
    may use an unsignedInt or integer as well."""
    for value in (parameter.valueString, parameter.valueUnsignedInt, parameter.valueInteger):
        if value is not None:
            return str(value)
    return None


def _event_number(event: Any) -> str | None:
    for part in _parts(event):
        if part.name == "event-number":
            return _count(part)
    return None


def _focus(event: Any) -> str | None:
    for part in _parts(event):
        if part.name == "focus" and part.valueReference is not None:
            reference = part.valueReference.reference
            return str(reference) if reference else None
    return None


def _parts(parameter: Any) -> Iterator[Any]:
    yield from parameter.part or ()


def _issue(path: str, text: str) -> Issue:
    return Issue("error", "required", f"{path} {text} (backport-subscription-status-r4).", (path,))
