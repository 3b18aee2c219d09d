"""FHIR R4 (4.0.1) at ingest's front door: read with the R4B models, minus what R4B changed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from fhir.resources.R4B import get_fhir_model_class as r4b_model_class
from fhir.resources.R4B.resource import Resource as R4BResource
from pydantic import SecretStr

from medmesh_contracts.events import FhirVersion
from medmesh_ingest import r4
from medmesh_ingest.auth import Authenticator
from medmesh_ingest.outcomes import FhirRejected
from medmesh_ingest.settings import IngestSettings, SourceSettings
from medmesh_ingest.validation import Limits, parse

FIXTURES = Path(__file__).parents[1] / "fixtures" / "fhir"


def fixture(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text())


def rejection(payload: dict[str, Any], version: FhirVersion = "R4") -> FhirRejected:
    with pytest.raises(FhirRejected) as caught:
        parse(json.dumps(payload).encode(), None, version, Limits())
    return caught.value


def test_r4_vitals_bundle_parses_as_r4() -> None:
    """A vitals Bundle sent as R4 parses with the R4B models and is labelled R4."""
    payload = parse((FIXTURES / "vitals-bundle-high.json").read_bytes(), None, "R4")
    assert payload.fhir_version == "R4"
    assert {r.resource_type for r in payload.resources} >= {"Patient", "Observation"}


@pytest.mark.parametrize("name", sorted(r4.R4B_ONLY_TYPES))
def test_every_r4b_only_type_is_an_r4b_resource(name: str) -> None:
    """Each type refused as R4B-only is a concrete resource type of the R4B models."""
    assert issubclass(r4b_model_class(name), R4BResource)


@pytest.mark.parametrize("name", sorted(r4.R4_ONLY_TYPES))
def test_every_r4_only_type_is_unknown_to_the_r4b_models(name: str) -> None:
    """Each type named as withdrawn in R4B has no R4B model (so R4B cannot validate it)."""
    with pytest.raises((KeyError, ValueError, AttributeError, ImportError)):
        r4b_model_class(name)


@pytest.mark.parametrize("name", ["SubscriptionStatus", "ClinicalUseDefinition", "Ingredient"])
def test_r4b_only_resource_sent_as_r4_is_refused_naming_it(name: str) -> None:
    """A resource of a type R4B added is 400 as R4, the OperationOutcome naming the type."""
    rejected = rejection({"resourceType": name})
    [issue] = rejected.outcome["issue"]
    assert rejected.status == 400
    assert issue["code"] == "not-supported"
    assert f"{name} is not an R4 (4.0.1) resource type" in issue["diagnostics"]
    assert issue["expression"] == ["resourceType"]


def test_r4b_only_resource_inside_an_r4_bundle_is_refused_at_its_entry() -> None:
    """An R4 Bundle carrying an R4B-only resource is 422, located at that entry's type."""
    bundle = fixture("vitals-bundle-high.json")
    bundle["entry"].append({"resource": {"resourceType": "SubscriptionTopic", "status": "active"}})
    rejected = rejection(bundle)
    [issue] = rejected.outcome["issue"]
    where = f"Bundle.entry[{len(bundle['entry']) - 1}].resource.resourceType"
    assert rejected.status == 422
    assert issue["expression"] == [where]
    assert "SubscriptionTopic is not an R4 (4.0.1) resource type" in issue["diagnostics"]


def test_the_same_r4b_only_resource_is_read_as_r4b() -> None:
    """The type refused as R4 is known as R4B: the refusal is about the version only."""
    bundle = fixture("subscription-handshake.json")
    assert parse(json.dumps(bundle).encode(), None, "R4B").notification is not None
    assert rejection(bundle).status == 422


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("MedicinalProduct", "which withdrew it"),
        ("SubstancePolymer", "which withdrew it"),
        ("Evidence", "defined differently in R4 and R4B"),
    ],
)
def test_r4_types_r4b_cannot_judge_are_refused_naming_them(name: str, text: str) -> None:
    """R4 types R4B withdrew or redefined are refused as R4, saying why, naming the type."""
    rejected = rejection({"resourceType": name})
    diagnostics = rejected.outcome["issue"][0]["diagnostics"]
    assert rejected.status == 400
    assert name in diagnostics
    assert text in diagnostics


def test_r4_source_setting_reads_as_r4() -> None:
    """A named source configured with fhir_version R4 is an R4 source; so is the default."""
    sources = {"ward": SourceSettings(token=SecretStr("ward-token"), fhir_version="R4")}
    auth = Authenticator(IngestSettings(ingest_sources=sources, default_fhir_version="R4"))
    ward = auth.source("Bearer ward-token")
    assert ward is not None
    assert ward.fhir_version == "R4"
    assert auth.default_source.fhir_version == "R4"


# --- Subscription notifications (Subscriptions R5 Backport IG, R4) ------------------------------


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("r4-subscription-handshake.json", "handshake"),
        ("r4-subscription-event-full.json", "event-notification"),
    ],
)
def test_r4_notifications_are_recognised(name: str, kind: str) -> None:
    """A history Bundle with a backport status Parameters first is a notification of its type."""
    payload = parse((FIXTURES / name).read_bytes(), None, "R4")
    assert payload.notification is not None
    assert payload.notification.type == kind
    assert payload.notification.id_only == ()


def test_r4_full_resource_notification_gives_its_resources() -> None:
    """The resources after the status Parameters are returned, the Parameters is not."""
    payload = parse((FIXTURES / "r4-subscription-event-full.json").read_bytes(), None, "R4")
    assert {r.resource_type for r in payload.resources} == {"Observation"}
    assert len(payload.resources) == 7


def test_r4_id_only_notification_names_the_event_foci() -> None:
    """Without the resources, the notification-event focus references are what to fetch."""
    bundle = fixture("r4-subscription-event-full.json")
    bundle["entry"] = bundle["entry"][:1]
    payload = parse(json.dumps(bundle).encode(), None, "R4")
    assert payload.notification is not None
    assert len(payload.notification.id_only) == 7
    assert payload.notification.id_only[0].endswith("/Observation/example-subscription-rr")


def _without_parameter(bundle: dict[str, Any], name: str) -> dict[str, Any]:
    status = bundle["entry"][0]["resource"]
    status["parameter"] = [p for p in status["parameter"] if p["name"] != name]
    return bundle


@pytest.mark.parametrize("missing", ["type", "subscription"])
def test_r4_status_without_a_required_parameter_is_422(missing: str) -> None:
    """The backport status Parameters needs its type and subscription parameters: else 422."""
    rejected = rejection(_without_parameter(fixture("r4-subscription-handshake.json"), missing))
    assert rejected.status == 422
    assert f"needs a {missing} parameter" in rejected.outcome["issue"][0]["diagnostics"]


def test_r4_bogus_notification_type_is_422() -> None:
    """A type parameter outside subscription-notification-type is 422."""
    bundle = fixture("r4-subscription-handshake.json")
    for parameter in bundle["entry"][0]["resource"]["parameter"]:
        if parameter["name"] == "type":
            parameter["valueCode"] = "ping"
    rejected = rejection(bundle)
    assert rejected.status == 422
    assert "subscription-notification-type" in rejected.outcome["issue"][0]["diagnostics"]


def test_r4_history_bundle_without_the_status_parameters_is_422() -> None:
    """An R4 history Bundle whose first entry is not a Parameters is no notification: 422."""
    bundle = fixture("r4-subscription-event-full.json")
    bundle["entry"].pop(0)
    rejected = rejection(bundle)
    assert rejected.status == 422
    assert "must be a Parameters" in rejected.outcome["issue"][0]["diagnostics"]
