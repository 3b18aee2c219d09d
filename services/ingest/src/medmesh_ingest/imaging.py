"""From an ImagingStudy (R4B or R5) to an image input's claim check: which series and instance
the model reads, and from which DICOMweb base the worker fetches it.

A series qualifies for an input (a spec input with ``image``) when:

- its ``modality`` (R4B Coding, R5 CodeableConcept) is one of the input's ``imaging-study``
  source codes and, when the spec lists ``modalities``, one of those;
- its ``bodySite`` (R4B Coding, R5 CodeableReference) is absent (or only a BodyStructure
  reference), or, when the spec lists ``body_parts`` (DICOM BodyPartExamined terms), one of its
  codings has a listed term as code or display (case-insensitively) or is the SNOMED CT code
  DICOM maps that term to (``BODY_PART_SNOMED``);
- it has a ``uid`` and an instance with a ``uid`` whose ``sopClass`` (a Coding in both
  versions) is one of the spec's ``sop_classes`` when it lists any (compared without a
  ``urn:oid:`` prefix).

The first qualifying instance of the first qualifying series is read: the models served read
one image each (the tensor is one preprocessed instance); reading several images of a study
(views, slices) would need a spec of how they combine, which no model has yet. The worker checks
the instance's own DICOM header again (body part, rows and columns, which only the header gives).

The series' first coded ``bodySite`` rides along (``ImageReference.body_site``) for the findings'
Observation.bodySite.

Where the worker fetches it: the first ``dicom-wado-rs`` Endpoint the series names, else the
study (a contained ``#id`` or an entry of the same payload), whose ``address`` must be one of
``MEDMESH_PACS_URLS``, compared without a trailing slash; an event never makes the worker call
an arbitrary host. A study naming no such endpoint is fetched from its source's own base
(``dicomweb_url`` of a source in ``MEDMESH_INGEST_SOURCES``), else from the first allowed base.

Refusals name FHIRPaths and the spec's own terms, never values from the payload: no UIDs (they
identify images, not patients, and still stay out of answers and logs), no addresses.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from medmesh_contracts.events import BodySiteCoding, ImageReference
from medmesh_contracts.modelspec import Coding, InputSpec, SeriesCriteria

DCM = "http://dicom.nema.org/resources/ontology/DCM"
SNOMED = "http://snomed.info/sct"
# ImagingStudy.identifier system of the Study Instance UID (value ``urn:oid:<uid>``).
DICOM_UID_SYSTEM = "urn:dicom:uid"
ENDPOINT_CONNECTION_TYPES = "http://terminology.hl7.org/CodeSystem/endpoint-connection-type"
WADO_RS = "dicom-wado-rs"
# Studies with these statuses have no images to read.
UNUSABLE_STUDY_STATUSES = frozenset({"cancelled", "entered-in-error"})
IMAGING_STUDY_STATUSES = frozenset(
    # R4B's imagingstudy-status, plus R5's ``inactive``.
    {"registered", "available", "cancelled", "entered-in-error", "unknown", "inactive"}
)
# DICOM BodyPartExamined defined terms and the SNOMED CT code DICOM PS3.16 Annex L (Table L-1,
# "Correspondence of Anatomic Region Codes and Body Part Examined Defined Terms") maps each to;
# only the terms the deployed specs use. A term's own spelling (code or display) always matches.
BODY_PART_SNOMED: Mapping[str, str] = {"CHEST": "51185008"}  # Thoracic structure
_OID_PREFIX = "urn:oid:"
# At most this many series are named in a refusal (a study may list hundreds).
_NAMED_SERIES = 3
_ENDPOINT_REFERENCE = re.compile(r"(?:^|/)(Endpoint/[A-Za-z0-9\-.]{1,64})(?:/_history/[^/]+)?$")


@dataclass(frozen=True)
class PacsPolicy:
    """The DICOMweb bases the worker may be sent to (``MEDMESH_PACS_URLS``); the first one is
    the base of studies that name no endpoint, unless their source has its own
    (``by_source``: source name to base, each one of ``allowed``)."""

    allowed: tuple[str, ...] = ()
    by_source: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_setting(cls, value: str) -> PacsPolicy:
        """The policy of a comma-separated list of bases (the setting's form)."""
        return cls(tuple(normalized(u) for u in value.split(",") if u.strip()))

    def with_sources(self, bases: Mapping[str, str]) -> PacsPolicy:
        """This policy with each named source's own default base (each must be allowed)."""
        for name, base in bases.items():
            if self.allows(base) is None:
                raise ValueError(f"source {name!r}: its DICOMweb base is not an allowed PACS")
        return replace(self, by_source={n: normalized(b) for n, b in bases.items()})

    def for_source(self, source: str | None) -> PacsPolicy:
        """The policy for a payload of ``source`` (None: the default source): its own base as
        the default when it has one."""
        base = self.by_source.get(source) if source is not None else None
        if base is None:
            return self
        return PacsPolicy((base, *(a for a in self.allowed if a != base)), self.by_source)

    @property
    def default(self) -> str | None:
        """The base of studies that name no DICOMweb endpoint (None: none configured)."""
        return self.allowed[0] if self.allowed else None

    def allows(self, address: str) -> str | None:
        """The allowed base ``address`` names (as configured), or None."""
        wanted = normalized(address)
        return wanted if wanted in self.allowed else None


def normalized(url: str) -> str:
    """A DICOMweb base as compared against the allowlist (as the worker compares it)."""
    return url.strip().rstrip("/")


@dataclass(frozen=True)
class Refusal:
    """Why a study gives an image input nothing: where (a FHIRPath) and what (no payload
    values)."""

    expression: str
    problem: str


class Endpoints:
    """The Endpoint resources of a payload, by how a study may refer to them."""

    def __init__(self, resources: Iterable[Any]) -> None:
        # (resource, its Bundle fullUrl) of each Endpoint of the payload.
        self._by_reference: dict[str, Any] = {}
        for resource, full_url in resources:
            if resource.id:
                self._by_reference[f"Endpoint/{resource.id}"] = resource
            if full_url:
                self._by_reference[full_url] = resource

    def resolve(self, owner: Any, reference: str | None) -> Any:
        """The Endpoint ``reference`` names: contained in ``owner`` (``#id``), or an entry of
        the payload (by fullUrl, or ``Endpoint/id`` relative or absolute); None: not here."""
        if not reference:
            return None
        if reference.startswith("#"):
            for contained in owner.contained or ():
                if contained.id == reference[1:] and _type(contained) == "Endpoint":
                    return contained
            return None
        found = self._by_reference.get(reference)
        if found is not None:
            return found
        match = _ENDPOINT_REFERENCE.search(reference)
        return self._by_reference.get(match.group(1)) if match else None


def read_study(
    study: Any,
    path: str,
    input_spec: InputSpec,
    endpoints: Endpoints,
    pacs: PacsPolicy,
) -> ImageReference | Refusal:
    """The instance of ``study`` (at FHIRPath ``path``) the image input reads and where it is,
    or why there is none."""
    image = input_spec.image
    if image is None:
        raise ValueError(f"input {input_spec.name!r} is not an image input")
    criteria = image.series
    sources = tuple(s.code for s in input_spec.sources if s.kind == "imaging-study")
    reasons: list[str] = []
    chosen: tuple[int, Any, Any] | None = None
    for i, series in enumerate(study.series or ()):
        problem = _series_problem(series, sources, criteria)
        if problem is None:
            instance = _first_instance(series, criteria)
            if instance is not None:
                chosen = (i, series, instance)
                break
            problem = "no instance with a uid" + (
                " and one of the model's SOP classes" if criteria.sop_classes else ""
            )
        reasons.append(f"series[{i}] {problem}")
    if chosen is None:
        return Refusal(f"{path}.series", _no_series(reasons))
    index, series, instance = chosen
    study_uid = _study_uid(study)
    if study_uid is None:
        return Refusal(
            f"{path}.identifier",
            f"no Study Instance UID: an identifier with system {DICOM_UID_SYSTEM} and a "
            f"value {_OID_PREFIX}<uid>",
        )
    base = _dicomweb_base(study, series, path, index, endpoints, pacs)
    if isinstance(base, Refusal):
        return base
    return ImageReference(
        dicomweb_url=base,
        study_uid=study_uid,
        series_uid=series.uid,
        instance_uid=instance.uid,
        body_site=_body_site(series.bodySite),
    )


# --- series ------------------------------------------------------------------------------------


def _series_problem(series: Any, sources: Sequence[Coding], criteria: SeriesCriteria) -> str | None:
    """Why the series does not qualify (its instances aside); None: it does."""
    if not series.uid:
        return "has no uid"
    modalities = [c for c in _codings(series.modality) if _is_source(c, sources)]
    if criteria.modalities:
        modalities = [c for c in modalities if c.code in criteria.modalities]
    if not modalities:
        wanted = [
            s.code for s in sources if not criteria.modalities or s.code in criteria.modalities
        ]
        return f"has a modality that is none of the model's ({', '.join(wanted)} in {DCM})"
    if criteria.body_parts and not _body_part_matches(series.bodySite, criteria.body_parts):
        return f"has a body site that is none of the model's ({', '.join(criteria.body_parts)})"
    return None


def _is_source(coding: Any, sources: Sequence[Coding]) -> bool:
    return any(coding.system == s.system and coding.code == s.code for s in sources)


def _body_part_matches(body_site: Any, body_parts: Sequence[str]) -> bool:
    """Whether the series' bodySite is absent or names one of the DICOM body parts."""
    codings = list(_codings(body_site))
    if not codings:
        return True  # not announced (or only a BodyStructure): the worker reads the header
    for part in body_parts:
        wanted = part.upper()
        snomed = BODY_PART_SNOMED.get(wanted)
        for coding in codings:
            if wanted in ((coding.code or "").upper(), (coding.display or "").upper()):
                return True
            if snomed is not None and coding.system == SNOMED and coding.code == snomed:
                return True
    return False


def _body_site(body_site: Any) -> BodySiteCoding | None:
    """The series' first bodySite coding with a system and a code (None: none coded)."""
    for coding in _codings(body_site):
        if coding.system and coding.code:
            return BodySiteCoding(
                system=str(coding.system), code=str(coding.code), display=coding.display
            )
    return None


def _first_instance(series: Any, criteria: SeriesCriteria) -> Any:
    """The first instance with a uid and, when the spec lists SOP classes, one of them."""
    allowed = {_without_oid_prefix(uid) for uid in criteria.sop_classes}
    for instance in series.instance or ():
        if not instance.uid:
            continue
        sop_class = instance.sopClass.code if instance.sopClass is not None else None
        if not allowed or (sop_class is not None and _without_oid_prefix(sop_class) in allowed):
            return instance
    return None


def _no_series(reasons: Sequence[str]) -> str:
    if not reasons:
        return "the study lists no series"
    named = "; ".join(reasons[:_NAMED_SERIES])
    more = len(reasons) - _NAMED_SERIES
    return "no series qualifies: " + named + (f"; and {more} more series" if more > 0 else "")


# --- UIDs and endpoint -------------------------------------------------------------------------


def _study_uid(study: Any) -> str | None:
    for identifier in study.identifier or ():
        if identifier.system == DICOM_UID_SYSTEM and identifier.value:
            uid = _without_oid_prefix(identifier.value)
            if uid:
                return uid
    return None


def _without_oid_prefix(uid: str) -> str:
    uid = uid.strip()
    return uid[len(_OID_PREFIX) :] if uid.startswith(_OID_PREFIX) else uid


def _dicomweb_base(
    study: Any, series: Any, path: str, index: int, endpoints: Endpoints, pacs: PacsPolicy
) -> str | Refusal:
    """The allowed base of the first WADO-RS endpoint the series, else the study, names; the
    default base when they name none."""
    named = [
        *(
            (f"{path}.series[{index}].endpoint[{i}]", r)
            for i, r in enumerate(series.endpoint or ())
        ),
        *((f"{path}.endpoint[{i}]", r) for i, r in enumerate(study.endpoint or ())),
    ]
    refused: str | None = None
    for where, reference in named:
        endpoint = endpoints.resolve(study, reference.reference)
        if endpoint is None or not _is_wado_rs(endpoint) or not endpoint.address:
            continue
        allowed = pacs.allows(str(endpoint.address))
        if allowed is not None:
            return allowed
        refused = refused or where
    if refused is not None:
        return Refusal(
            refused,
            "the study's DICOMweb (dicom-wado-rs) endpoint is not one of the PACS ingest may "
            "send the worker to (MEDMESH_PACS_URLS)",
        )
    if pacs.default is None:
        return Refusal(
            f"{path}.endpoint",
            "no usable DICOMweb endpoint: the study names no dicom-wado-rs Endpoint with an "
            "address, and no default PACS is configured (MEDMESH_PACS_URLS)",
        )
    return pacs.default


def _is_wado_rs(endpoint: Any) -> bool:
    return any(
        c.code == WADO_RS and c.system in (None, ENDPOINT_CONNECTION_TYPES)
        for c in _codings(endpoint.connectionType)
    )


def _codings(element: Any) -> Iterator[Any]:
    """The Codings of a Coding, a CodeableConcept, a CodeableReference's concept, or a list of
    them (R4B and R5 type the same elements differently)."""
    if element is None:
        return
    if isinstance(element, list | tuple):
        for item in element:
            yield from _codings(item)
        return
    if hasattr(element, "concept"):  # CodeableReference
        yield from _codings(element.concept)
    elif hasattr(element, "coding"):  # CodeableConcept
        yield from element.coding or ()
    else:  # Coding
        yield element


def _type(resource: Any) -> str:
    return str(resource.get_resource_type())
