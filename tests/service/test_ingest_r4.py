"""FHIR R4 (4.0.1) through the ingest app: by content type, by source setting, and refused."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from fhir.resources.R4B.capabilitystatement import CapabilityStatement as R4BCapabilityStatement

from tests.service.conftest import FIXTURES
from tests.service.test_ingest_app import Harness, diagnostics, requests_of, running, settings

R4 = {"content-type": "application/fhir+json; fhirVersion=4.0"}
FHIR = {"content-type": "application/fhir+json"}


@pytest.fixture
async def ingest() -> AsyncIterator[Harness]:
    """Ingest without tokens (loopback), R4B by default."""
    async with running(settings()) as harness:
        yield harness


@pytest.fixture
async def r4_source() -> AsyncIterator[Harness]:
    """Ingest with a named source configured for R4."""
    sources = {"ward-r4": {"token": "r4-secret-token", "fhir_version": "R4", "site": "ward"}}
    async with running(settings(ingest_sources=sources)) as harness:
        yield harness


async def _post(harness: Harness, name: str, headers: dict[str, str]) -> httpx.Response:
    return await harness.client.post(
        "/fhir", content=(FIXTURES / name).read_bytes(), headers=headers
    )


async def test_r4_bundle_by_content_type_is_accepted(ingest: Harness) -> None:
    """fhirVersion=4.0 reads a vitals Bundle as R4: 202, and the request's source says R4."""
    response = await _post(ingest, "vitals-bundle-high.json", R4)
    assert response.status_code == 202, response.text
    [request] = requests_of(ingest)
    assert request.source.fhir_version == "R4"
    assert request.subject_reference == "Patient/example-high"


async def test_r4_bundle_by_source_setting_is_accepted(r4_source: Harness) -> None:
    """A source configured for R4 has a payload without fhirVersion read as R4: 202."""
    response = await _post(
        r4_source,
        "vitals-bundle-high.json",
        {**FHIR, "authorization": "Bearer r4-secret-token"},
    )
    assert response.status_code == 202, response.text
    [request] = requests_of(r4_source)
    assert request.source.fhir_version == "R4"
    assert request.source.source_system == "ward-r4"


async def test_content_type_overrides_an_r4_source_setting(r4_source: Harness) -> None:
    """An R4 source that names fhirVersion=4.3 in its content type is read as R4B."""
    response = await _post(
        r4_source,
        "subscription-event-full.json",
        {
            "content-type": "application/fhir+json; fhirVersion=4.3",
            "authorization": "Bearer r4-secret-token",
        },
    )
    assert response.status_code == 202, response.text
    [request] = requests_of(r4_source)
    assert request.source.fhir_version == "R4B"


async def test_r4b_only_resource_as_r4_is_refused_naming_the_type(ingest: Harness) -> None:
    """An R4 payload with an R4B-only resource (SubscriptionStatus) gets an OperationOutcome
    naming the type, and nothing is published."""
    response = await _post(ingest, "subscription-event-full.json", R4)
    assert response.status_code == 422
    assert response.json()["resourceType"] == "OperationOutcome"
    assert "SubscriptionStatus is not an R4 (4.0.1) resource type" in diagnostics(response)
    assert ingest.captured.requests == []


async def test_r4_notification_is_processed(ingest: Harness) -> None:
    """An R4 backport event-notification (status Parameters first) becomes an R4 request."""
    response = await _post(ingest, "r4-subscription-event-full.json", R4)
    assert response.status_code == 202, response.text
    [request] = requests_of(ingest)
    assert request.source.fhir_version == "R4"
    assert request.subject_reference == "Patient/example-subscription-r4"


async def test_r4_handshake_is_acknowledged(r4_source: Harness) -> None:
    """An R4 handshake from an R4 source is acknowledged with 200 and starts nothing."""
    response = await _post(
        r4_source,
        "r4-subscription-handshake.json",
        {**FHIR, "authorization": "Bearer r4-secret-token"},
    )
    assert response.status_code == 200, response.text
    assert "acknowledged" in diagnostics(response)
    assert r4_source.captured.requests == []


async def test_capability_statement_in_r4_on_request(ingest: Harness) -> None:
    """Accept with fhirVersion=4.0 gets the statement with fhirVersion 4.0.1 (valid with the
    R4B model, whose CapabilityStatement is R4's)."""
    response = await ingest.client.get("/fhir/metadata", headers={"accept": R4["content-type"]})
    assert response.status_code == 200
    assert response.json()["fhirVersion"] == "4.0.1"
    R4BCapabilityStatement.model_validate(response.json())
