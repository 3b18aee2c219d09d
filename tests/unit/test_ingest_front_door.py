"""The front door's own rules: tokens, listen addresses, FHIR versions, limits and shapes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from medmesh_contracts.events import FhirVersion
from medmesh_ingest.auth import Authenticator, check_listen_address
from medmesh_ingest.fetch import resource_url
from medmesh_ingest.outcomes import FhirRejected
from medmesh_ingest.settings import IngestSettings, SourceSettings
from medmesh_ingest.transport import requested_version
from medmesh_ingest.validation import Limits, parse

FIXTURES = Path(__file__).parents[1] / "fixtures" / "fhir"


def fixture(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text())


def rejection(payload: bytes | dict[str, Any], version: FhirVersion = "R4B") -> FhirRejected:
    raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    with pytest.raises(FhirRejected) as caught:
        parse(raw, None, version, Limits(max_depth=16, max_entries=20))
    return caught.value


# --- tokens and listen addresses ---------------------------------------------------------------


def test_without_tokens_every_caller_is_the_default_source() -> None:
    """No tokens configured: no token is required and the default source is used."""
    auth = Authenticator(IngestSettings())
    assert not auth.required
    source = auth.source(None)
    assert source is not None
    assert source.name == "default"


def test_tokens_map_to_their_sources() -> None:
    """Comma-separated tokens are the default source; ingest_sources tokens are named sources."""
    sources = {"lab": SourceSettings(token=SecretStr("lab-token"), fhir_version="R5")}
    auth = Authenticator(IngestSettings(ingest_tokens=SecretStr("a, b"), ingest_sources=sources))
    assert auth.required
    assert auth.source("Bearer b") == auth.default_source
    lab = auth.source("bearer lab-token")
    assert lab is not None
    assert (lab.name, lab.fhir_version) == ("lab", "R5")
    assert auth.source("Bearer c") is None
    assert auth.source(None) is None


def test_listen_check_needs_tokens_beyond_loopback() -> None:
    """A public address without tokens is refused; with a token or on loopback it is fine."""
    with pytest.raises(ValueError, match="MEDMESH_INGEST_TOKENS"):
        check_listen_address(IngestSettings(http_host="0.0.0.0"))  # noqa: S104
    check_listen_address(IngestSettings(http_host="0.0.0.0", ingest_tokens=SecretStr("t")))  # noqa: S104
    check_listen_address(IngestSettings(http_host="127.0.0.1"))


# --- FHIR versions -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content_type", "version"),
    [
        (None, "R4B"),
        ("application/fhir+json", "R4B"),
        ("application/fhir+json; fhirVersion=4.3", "R4B"),
        ("application/fhir+json; fhirVersion=4.0", "R4"),
        ("application/fhir+json; fhirVersion=4.0.1", "R4"),
        ("application/fhir+json; fhirVersion=5.0", "R5"),
        ('application/json; charset=utf-8; fhirversion="5.0.0"', "R5"),
    ],
)
def test_content_type_names_the_version(content_type: str | None, version: str) -> None:
    """fhirVersion in the content type picks R4, R4B or R5; without it the source default holds."""
    assert requested_version(content_type, "R4B") == version


def test_source_default_applies_without_fhir_version() -> None:
    """A source configured for R5 gets R5 when the content type names no version."""
    assert requested_version("application/fhir+json", "R5") == "R5"


@pytest.mark.parametrize(
    "content_type",
    [
        "application/fhir+json; fhirVersion=3.0",
        "application/fhir+json; fhirVersion=4.1",
        "text/plain",
        "application/xml",
    ],
)
def test_unknown_versions_and_media_types_are_415(content_type: str) -> None:
    """STU3 (3.0), the R4B ballot (4.1) and non-JSON media types are 415."""
    with pytest.raises(FhirRejected) as caught:
        requested_version(content_type, "R4B")
    assert caught.value.status == 415


def test_415_names_the_versions_spoken() -> None:
    """The 415 for an unspoken fhirVersion lists R4 (4.0), R4B (4.3) and R5 (5.0)."""
    with pytest.raises(FhirRejected) as caught:
        requested_version("application/fhir+json; fhirVersion=3.0", "R4B")
    text = caught.value.outcome["issue"][0]["diagnostics"]
    assert "R4 (4.0), R4B (4.3) and R5 (5.0)" in text


# --- limits ------------------------------------------------------------------------------------


def test_nesting_beyond_the_limit_is_413() -> None:
    """Objects and arrays nested deeper than max_depth are 413 too-costly."""
    deep: Any = {"resourceType": "Basic"}
    node = deep
    for _ in range(20):
        node["extension"] = [{"url": "https://x"}]
        node = node["extension"][0]
    rejected = rejection(deep)
    assert rejected.status == 413
    assert rejected.outcome["issue"][0]["code"] == "too-costly"


def test_nesting_past_the_interpreter_recursion_limit_is_413() -> None:
    """A million open brackets is a 413, not a RecursionError."""
    assert rejection(b"[" * 1_000_000).status == 413


def test_too_many_entries_is_413() -> None:
    """More Bundle entries than max_entries is 413 at Bundle.entry."""
    entries = [{"resource": {"resourceType": "Basic", "code": {"text": "x"}}}] * 21
    rejected = rejection({"resourceType": "Bundle", "type": "collection", "entry": entries})
    assert rejected.status == 413
    assert rejected.outcome["issue"][0]["expression"] == ["Bundle.entry"]


# --- shapes ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("subscription-handshake.json", "handshake"),
        ("subscription-heartbeat.json", "heartbeat"),
        ("subscription-event-full.json", "event-notification"),
    ],
)
def test_r4b_notifications_are_recognised(name: str, kind: str) -> None:
    """A history Bundle with a SubscriptionStatus first is a notification of its type."""
    payload = parse((FIXTURES / name).read_bytes())
    assert payload.notification is not None
    assert payload.notification.type == kind
    assert payload.notification.id_only == ()


def test_full_resource_notification_gives_its_resources() -> None:
    """The resources after the SubscriptionStatus are returned, the status itself is not."""
    payload = parse((FIXTURES / "subscription-event-full.json").read_bytes())
    assert {r.resource_type for r in payload.resources} == {"Observation"}
    assert len(payload.resources) == 7


def test_id_only_notification_names_what_to_fetch() -> None:
    """Entries without a resource (and event focus references) are the id-only content."""
    payload = parse((FIXTURES / "subscription-event-id-only.json").read_bytes())
    assert payload.resources == []
    assert payload.notification is not None
    assert len(payload.notification.id_only) == 7
    assert payload.notification.id_only[0].endswith("/Observation/example-id-only-rr")


def test_history_bundle_without_subscription_status_is_rejected() -> None:
    """A history Bundle that is not a notification is 422 at Bundle.entry[0].resource."""
    bundle = fixture("subscription-event-full.json")
    bundle["entry"].pop(0)
    rejected = rejection(bundle)
    assert rejected.status == 422
    assert rejected.outcome["issue"][0]["expression"] == ["Bundle.entry[0].resource"]


def test_bogus_notification_type_is_rejected() -> None:
    """SubscriptionStatus.type outside its value set is 422 (fhir.resources does not check)."""
    bundle = fixture("subscription-heartbeat.json")
    bundle["entry"][0]["resource"]["type"] = "ping"
    rejected = rejection(bundle)
    assert rejected.status == 422
    assert rejected.outcome["issue"][0]["expression"] == ["Bundle.entry[0].resource.type"]


def test_r5_notification_parses_as_r5() -> None:
    """The R5 subscription-notification fixture parses with fhir.resources' R5 models."""
    payload = parse((FIXTURES / "r5-subscription-notification.json").read_bytes(), None, "R5")
    assert payload.fhir_version == "R5"
    assert payload.bundle_type == "subscription-notification"
    assert len(payload.resources) == 7


def test_r5_only_resource_type_is_not_r4b() -> None:
    """An R5-only resource type (ActorDefinition) is 400 as R4B and parses as R5."""
    resource = {"resourceType": "ActorDefinition", "status": "active", "type": "person"}
    assert rejection(resource).status == 400
    assert parse(json.dumps(resource).encode(), None, "R5").resources


def test_message_bundle_needs_message_header_first() -> None:
    """A message Bundle starting with anything but a MessageHeader is 422."""
    bundle = fixture("message-bundle.json")
    bundle["entry"] = bundle["entry"][1:]
    assert rejection(bundle).status == 422
    assert len(parse((FIXTURES / "message-bundle.json").read_bytes()).resources) == 8


def test_transaction_urn_subjects_resolve() -> None:
    """Transaction entries referring to the Patient by urn:uuid resolve to Patient/<id>."""
    payload = parse((FIXTURES / "transaction-bundle.json").read_bytes())
    subjects = {r.subject_reference for r in payload.resources if r.resource_type == "Observation"}
    assert subjects == {"Patient/example-transaction"}


def test_service_request_subject_must_be_a_patient() -> None:
    """A ServiceRequest whose subject is a Group is 422 at ServiceRequest.subject."""
    order = fixture("service-request-order.json")
    order["subject"] = {"reference": "Group/ward-7"}
    assert rejection(order).outcome["issue"][0]["expression"] == ["ServiceRequest.subject"]


# --- fetching ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reference", "url"),
    [
        ("Observation/1", "https://ehr.example/fhir/Observation/1"),
        ("https://ehr.example/fhir/Observation/1", "https://ehr.example/fhir/Observation/1"),
        ("https://evil.example/fhir/Observation/1", None),
        ("https://ehr.example/fhir/../admin", None),
        ("Observation/1?_format=xml", None),
    ],
)
def test_only_the_source_server_is_fetched_from(reference: str, url: str | None) -> None:
    """References resolve against the source's base URL; anything elsewhere is refused."""
    assert resource_url("https://ehr.example/fhir/", reference) == url
