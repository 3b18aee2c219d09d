"""Where the patient is: the ward and site of an encounter, from the payload's Encounter and
Location resources (no I/O). They travel in the request's source context and headers, where the
router's rules read them (``medmesh models route --rule version=2,ward=icu``).

- **Ward**: of the Encounter's locations, the current one (the first whose status is ``active``,
  else the last listed), followed up its ``partOf`` chain within the payload (a bed is part of a
  room, a room of a ward) to the first one whose physical type is ``wa`` (ward, in
  http://terminology.hl7.org/CodeSystem/location-physical-type; R5 calls it ``form``), on the
  Location resource or on the Encounter's location entry. Its value: the Location's first
  identifier value, else its name, else the reference's display. A location of no known type
  names no ward: a rule must not route on a guess.
- **Site**: the Encounter's ``serviceProvider``: its identifier value, else its display. A site
  configured for the source (``MEDMESH_INGEST_SOURCES``) wins over it.

These values name places and organisations, not patients.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from medmesh_ingest.validation import ParsedResource

PHYSICAL_TYPE = "http://terminology.hl7.org/CodeSystem/location-physical-type"
WARD = "wa"
# How far up a partOf chain a ward is looked for (bed, room, ward, wing...).
MAX_DEPTH = 8


@dataclass(frozen=True)
class Placement:
    """The ward and site an encounter names (None: not said in the payload)."""

    ward: str | None = None
    site: str | None = None


def placements(resources: Sequence[ParsedResource]) -> dict[str, Placement]:
    """Each Encounter of the payload that names a ward or a site, by the reference its
    resources use for it (``Encounter/<id>``, else the entry's ``fullUrl``)."""
    locations: dict[str, Any] = {}
    for parsed in resources:
        if parsed.resource.get_resource_type() == "Location":
            for key in _keys(parsed, "Location"):
                locations[key] = parsed.resource
    found: dict[str, Placement] = {}
    for parsed in resources:
        if parsed.resource.get_resource_type() != "Encounter":
            continue
        placement = Placement(_ward(parsed.resource, locations), _site(parsed.resource))
        if placement != Placement():
            for key in _keys(parsed, "Encounter"):
                found[key] = placement
    return found


def _keys(parsed: ParsedResource, resource_type: str) -> list[str]:
    keys = [f"{resource_type}/{parsed.resource.id}"] if parsed.resource.id else []
    return keys + ([parsed.full_url] if parsed.full_url else [])


def _ward(encounter: Any, locations: dict[str, Any]) -> str | None:
    entries = list(encounter.location or [])
    if not entries:
        return None
    current = next((e for e in entries if e.status == "active"), entries[-1])
    if _is_ward(_physical_type(current)):
        return _name(locations.get(_reference(current.location)), current.location)
    location = locations.get(_reference(current.location))
    for _ in range(MAX_DEPTH):
        if location is None:
            return None
        if _is_ward(_physical_type(location)):
            return _name(location, None)
        location = locations.get(_reference(location.partOf))
    return None


def _site(encounter: Any) -> str | None:
    provider = encounter.serviceProvider
    if provider is None:
        return None
    identifier = provider.identifier
    if identifier is not None and identifier.value:
        return str(identifier.value)
    return str(provider.display) if provider.display else None


def _physical_type(element: Any) -> Any:
    """R4/R4B ``physicalType``, R5 ``form`` (a CodeableConcept, or None)."""
    return getattr(element, "physicalType", None) or getattr(element, "form", None)


def _is_ward(concept: Any) -> bool:
    codings: Iterable[Any] = concept.coding or [] if concept is not None else []
    return any(c.system == PHYSICAL_TYPE and c.code == WARD for c in codings)


def _reference(reference: Any) -> str:
    return str(reference.reference) if reference is not None and reference.reference else ""


def _name(location: Any, reference: Any) -> str | None:
    if location is not None:
        for identifier in location.identifier or []:
            if identifier.value:
                return str(identifier.value)
        if location.name:
            return str(location.name)
    if reference is not None and reference.display:
        return str(reference.display)
    return None
