"""The ward and site of an encounter, read from the payload's Encounter and Location resources."""

from __future__ import annotations

import json
from copy import deepcopy
from pathlib import Path
from typing import Any

from medmesh_ingest.locations import PHYSICAL_TYPE, Placement, placements
from medmesh_ingest.validation import parse

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "fhir"
ENCOUNTER = "Encounter/example-high-admission"
BASE = "https://ehr.st-elsewhere.example/fhir"


def _kind(code: str) -> dict[str, Any]:
    return {"coding": [{"system": PHYSICAL_TYPE, "code": code}]}


def _location(ident: str, name: str, code: str, part_of: str | None = None) -> dict[str, Any]:
    location: dict[str, Any] = {
        "resourceType": "Location",
        "id": ident,
        "identifier": [{"system": "https://ehr.example/locations", "value": name.lower()}],
        "name": name,
        "physicalType": _kind(code),
    }
    if part_of is not None:
        location["partOf"] = {"reference": f"Location/{part_of}"}
    return {"fullUrl": f"{BASE}/Location/{ident}", "resource": location}


def _bundle(locations: list[dict[str, Any]], encounter_locations: list[dict[str, Any]]) -> bytes:
    """vitals-bundle-high with these Locations and its Encounter's location list."""
    bundle = json.loads((FIXTURES / "vitals-bundle-high.json").read_text())
    for entry in bundle["entry"]:
        if entry["resource"]["resourceType"] == "Encounter":
            entry["resource"]["location"] = deepcopy(encounter_locations)
            entry["resource"]["serviceProvider"] = {"display": "St Elsewhere North"}
    bundle["entry"] += locations
    return json.dumps(bundle).encode()


def _placements(raw: bytes) -> dict[str, Placement]:
    return placements(parse(raw).resources)


def test_the_current_bed_is_followed_up_to_its_ward() -> None:
    """The active location (a bed) is followed through its room to the ward Location, whose
    identifier value is the ward; the service provider's display is the site."""
    raw = _bundle(
        [
            _location("icu", "ICU", "wa"),
            _location("icu-3", "ICU room 3", "ro", part_of="icu"),
            _location("icu-3-b", "ICU bed 3B", "bd", part_of="icu-3"),
            _location("ed", "ED", "wa"),
        ],
        [
            {"location": {"reference": "Location/ed"}, "status": "completed"},
            {"location": {"reference": "Location/icu-3-b"}, "status": "active"},
        ],
    )
    assert _placements(raw)[ENCOUNTER] == Placement(ward="icu", site="St Elsewhere North")


def test_a_location_typed_ward_on_the_encounter_needs_no_location_resource() -> None:
    """An encounter location entry typed ward names the ward by its reference's display when
    the Location itself is not in the payload."""
    raw = _bundle(
        [],
        [
            {
                "location": {"reference": "Location/w7", "display": "Ward 7"},
                "status": "active",
                "physicalType": _kind("wa"),
            }
        ],
    )
    assert _placements(raw)[ENCOUNTER].ward == "Ward 7"


def test_a_location_of_no_known_type_names_no_ward() -> None:
    """An untyped location (it could be a bed, a ward or a building) names no ward: a routing
    rule must not act on a guess; the site is still read."""
    raw = _bundle([], [{"location": {"reference": "Location/x", "display": "Somewhere"}}])
    assert _placements(raw)[ENCOUNTER] == Placement(ward=None, site="St Elsewhere North")
