"""The CapabilityStatement (GET /fhir/metadata): valid FHIR, only what ingest honours, and a
security section that names the authentication configured."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from fhir.resources.capabilitystatement import CapabilityStatement as R5CapabilityStatement
from fhir.resources.R4B.capabilitystatement import CapabilityStatement as R4BCapabilityStatement

from medmesh_contracts.events import FhirVersion
from medmesh_contracts.modelspec import load_specs
from medmesh_ingest.capability import capability_statement, metadata_version

SPECS = load_specs(Path(__file__).resolve().parents[2] / "deploy" / "models")
PUBLISHED = datetime(2026, 12, 5, 10, 0, tzinfo=UTC)


def statement(
    *, tokens: bool = False, tls: bool = False, version: FhirVersion = "R4B"
) -> dict[str, Any]:
    return capability_statement(
        SPECS.values(), PUBLISHED, tokens=tokens, tls=tls, fhir_version=version
    )


@pytest.mark.parametrize("version", ["R4", "R4B", "R5"])
@pytest.mark.parametrize("tokens", [False, True])
def test_the_statement_is_valid_fhir_of_its_version(version: FhirVersion, tokens: bool) -> None:
    """R4, R4B and R5 statements, with and without tokens, validate with fhir.resources (R4
    with the R4B model, whose CapabilityStatement is R4's) and keep the invariants
    fhir.resources does not check (cpb-1 rest, cpb-2 software, cpb-14 an instance has an
    implementation)."""
    body = statement(tokens=tokens, version=version)
    model = R5CapabilityStatement if version == "R5" else R4BCapabilityStatement
    model.model_validate(body)
    assert body["fhirVersion"] == {"R4": "4.0.1", "R4B": "4.3.0", "R5": "5.0.0"}[version]
    assert body["rest"]
    assert body["software"]
    assert body["implementation"]
    assert body["kind"] == "instance"


def test_every_statement_names_the_versions_accepted() -> None:
    """A statement has one fhirVersion, so its documentation names the three versions read."""
    for version in ("R4", "R4B", "R5"):
        text = statement(version=version)["rest"][0]["documentation"]
        assert "R4 (4.0.1) with fhirVersion=4.0" in text
        assert "R4B by default" in text
        assert "R5 with fhirVersion=5.0" in text


def test_only_honoured_interactions_are_listed() -> None:
    """System interactions: transaction and batch; per resource: create of Observation,
    ImagingStudy and ServiceRequest only (Patient, Encounter, Endpoint and Bundle cause nothing
    on their own), each create documented as not stored."""
    [rest] = statement()["rest"]
    assert sorted(i["code"] for i in rest["interaction"]) == ["batch", "transaction"]
    assert {r["type"]: [i["code"] for i in r["interaction"]] for r in rest["resource"]} == {
        "Observation": ["create"],
        "ImagingStudy": ["create"],
        "ServiceRequest": ["create"],
    }
    for resource in rest["resource"]:
        assert "not stored" in resource["interaction"][0]["documentation"]


def test_security_without_tokens_says_there_is_none() -> None:
    """No tokens: no security service, no CORS, and the description says so and names the
    loopback-only rule."""
    security = statement()["rest"][0]["security"]
    assert "service" not in security
    assert security["cors"] is False
    assert "No authentication" in security["description"]
    assert "loopback" in security["description"]


def test_security_with_tokens_names_bearer_tokens() -> None:
    """Tokens configured: the service is a static bearer token (text: no restful-security-service
    code fits), the description names the settings and the 401 answer."""
    security = statement(tokens=True)["rest"][0]["security"]
    [service] = security["service"]
    assert service == {"text": "Bearer token (static, configured per sending system)"}
    assert "MEDMESH_INGEST_TOKENS" in security["description"]
    assert "401" in security["description"]
    assert "OAuth" in security["description"]  # says it is not OAuth


def test_security_says_who_speaks_tls() -> None:
    """The description tells whether ingest serves HTTPS itself or expects TLS in front."""
    assert "HTTPS itself" in statement(tls=True)["rest"][0]["security"]["description"]
    assert "plain HTTP" in statement(tls=False)["rest"][0]["security"]["description"]


@pytest.mark.parametrize(
    ("accept", "expected"),
    [
        (None, "R4B"),
        ("*/*", "R4B"),
        ("application/fhir+json", "R4B"),
        ("application/fhir+json; fhirVersion=5.0", "R5"),
        ("application/json, application/fhir+json;fhirversion=4.3.0", "R4B"),
        ('application/fhir+json; fhirVersion="5.0.0"', "R5"),
        ("application/fhir+json; fhirVersion=4.0", "R4"),
        ("application/fhir+json; fhirVersion=4.0.1", "R4"),
        ("application/fhir+json; fhirVersion=3.0", None),
    ],
)
def test_metadata_version_from_accept(accept: str | None, expected: FhirVersion | None) -> None:
    """Accept's fhirVersion picks the statement's version; none: the default; 3.0: None (406)."""
    assert metadata_version(accept, "R4B") == expected
