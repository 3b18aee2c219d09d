"""The CapabilityStatement ingest answers at GET /fhir/metadata: what it honours, no more.

Checked against the code (tests/unit/test_ingest_capability.py, tests/service/test_ingest_app.py):

- ``batch`` and ``transaction`` (system interactions at the base): answered with a
  batch-response / transaction-response Bundle (``bundle_response``).
- ``create`` of Observation, ImagingStudy and ServiceRequest (POST /fhir/{type}): the only
  resource types whose resources cause anything on their own (readings, image readings,
  orders). Nothing is stored, so the
  answer differs from FHIR's create (202 or 200 with an OperationOutcome, no id, no Location):
  each resource's documentation says so. Patient and Encounter are read only as reference
  targets inside a Bundle, and a Bundle POSTed to /fhir is processed, not stored: none of them
  is listed.
- ``security``: the bearer tokens in use (static, configured per sender), or none, as the
  settings say; no CORS.

The default FHIR version's statement by default (R4B unless MEDMESH_DEFAULT_FHIR_VERSION says
otherwise); ``Accept: application/fhir+json; fhirVersion=5.0`` asks for the R5 statement and
``fhirVersion=4.0`` for the R4 one (fhirVersion 4.0.1): the same content, since ingest reads
payloads of each of the three versions sent with that content type. A CapabilityStatement has
one fhirVersion, so each statement's documentation names the other versions too. R4 is read
with the R4B definitions (``medmesh_ingest.r4``), so the R4 statement is built the same way.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from medmesh_contracts.events import FhirVersion
from medmesh_contracts.modelspec import ModelSpec

FHIR_RELEASES: dict[FhirVersion, str] = {"R4": "4.0.1", "R4B": "4.3.0", "R5": "5.0.0"}
# fhirVersion MIME parameter values (``4.3``, ``4.3.0``, ``5.0``...) and the version they name.
_MIME_VERSIONS: dict[str, FhirVersion] = {"4.0": "R4", "4.3": "R4B", "5.0": "R5"}

_REST_DOCUMENTATION = (
    "medmesh ingest validates FHIR and has readings scored by the deployed models; it stores "
    "no resource (medmesh's reporting service delivers the reports). POST one "
    "Observation, ImagingStudy or ServiceRequest to /fhir/{type}, or a Bundle to /fhir: batch or transaction "
    "(answered with a batch-response or transaction-response Bundle), collection, message "
    "(MessageHeader first, processed as a collection), or a Subscription notification (R4B "
    "backport history Bundle or subscription-notification, SubscriptionStatus first; R4 "
    "backport history Bundle, its backport-subscription-status-r4 Parameters first; history "
    "entries carry request and response; R5 subscription-notification); events missed (a gap "
    "in the event numbers) are asked of the source with $events. Patient, Encounter and Endpoint "
    "resources are read as reference targets inside a Bundle. An ImagingStudy is read by the "
    "deployed imaging models: its first qualifying series and instance, fetched by the worker "
    "over DICOMweb (WADO-RS) from the study's dicom-wado-rs Endpoint, which must be a PACS "
    "ingest is configured to allow, else from the configured default PACS; a study none of "
    "them can read is answered 422 saying why. Any 2xx means every inference request the "
    "payload caused is committed in Kafka; 503 with Retry-After means nothing was taken: send "
    "it again. FHIR R4B by default (or the version configured for the sending system); R4 "
    "(4.0.1) with fhirVersion=4.0 in the content type, R5 with fhirVersion=5.0. Reports are "
    "written in the version the source spoke."
)
_CREATE_DOCUMENTATION = (
    "Accepted for scoring, not stored: 202 Accepted with an OperationOutcome naming the "
    "inference request(s) when the resource completed a model's inputs (or ordered a score), "
    "200 OK with an OperationOutcome otherwise (readings kept until the set is complete, or "
    "nothing to do). No id is assigned and no Location is returned; the correlation ids are "
    "in the medmesh-correlation-id header."
)
_BATCH_DOCUMENTATION = (
    "Each entry on its own: the answer (200) is a batch-response Bundle with one entry per "
    "request entry, in order: 202 Accepted when an inference request took an input from it, "
    "200 OK when accepted with nothing sent now, 4xx with an OperationOutcome when the entry is "
    "invalid (the other entries are still processed). No response.location: nothing is stored. "
    "Entries' resources are taken as data whatever request.method names (POST or PUT expected)."
)
_TRANSACTION_DOCUMENTATION = (
    "All or nothing: any invalid entry rejects the whole transaction with one OperationOutcome "
    "(422, or 413 over a limit) and nothing is sent; otherwise the answer (200) is a "
    "transaction-response Bundle with one entry per request entry, in order (202 Accepted or "
    "200 OK, as for batch). urn:uuid references between entries are resolved."
)


def capability_statement(
    specs: Iterable[ModelSpec],
    published: datetime,
    *,
    tokens: bool,
    tls: bool = False,
    fhir_version: FhirVersion = "R4B",
) -> dict[str, Any]:
    """What this endpoint honours, in ``fhir_version``. ``tokens``: bearer tokens are
    configured (and required); ``tls``: ingest serves HTTPS itself."""
    models = sorted(s.name for s in specs)
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": published.isoformat(),
        "kind": "instance",
        "software": {"name": "medmesh ingest", "version": "0.1.0"},
        "implementation": {
            "description": "medmesh FHIR front door; deployed models: " + ", ".join(models)
        },
        "fhirVersion": FHIR_RELEASES[fhir_version],
        "format": ["application/fhir+json", "application/json"],
        "rest": [
            {
                "mode": "server",
                "documentation": _REST_DOCUMENTATION,
                "security": security(tokens=tokens, tls=tls),
                "resource": [
                    {
                        "type": resource_type,
                        "interaction": [{"code": "create", "documentation": _CREATE_DOCUMENTATION}],
                    }
                    for resource_type in ("Observation", "ImagingStudy", "ServiceRequest")
                ],
                "interaction": [
                    {"code": "transaction", "documentation": _TRANSACTION_DOCUMENTATION},
                    {"code": "batch", "documentation": _BATCH_DOCUMENTATION},
                ],
            }
        ],
    }


def security(*, tokens: bool, tls: bool) -> dict[str, Any]:
    """CapabilityStatement.rest.security: the authentication in use, as configured.

    Static bearer tokens are none of the restful-security-service codes (OAuth, SMART-on-FHIR,
    Basic...; an extensible binding), so the service is named by text only.
    """
    transport = (
        "Ingest serves HTTPS itself (MEDMESH_TLS_CERT_FILE)."
        if tls
        else "Ingest itself speaks plain HTTP: TLS is terminated in front of it."
    )
    if not tokens:
        return {
            "cors": False,
            "description": (
                "No authentication: no bearer token is configured (MEDMESH_INGEST_TOKENS, "
                "MEDMESH_INGEST_SOURCES), so any caller that reaches ingest may POST; without "
                "tokens ingest listens on a loopback address only and refuses any other. For "
                f"development, not for production. {transport}"
            ),
        }
    return {
        "cors": False,
        "service": [{"text": "Bearer token (static, configured per sending system)"}],
        "description": (
            "Every POST needs Authorization: Bearer <token>, one of the tokens configured in "
            "MEDMESH_INGEST_TOKENS or MEDMESH_INGEST_SOURCES (a source's token names the sending "
            "system and its FHIR version); a missing or unknown token is answered 401 with a "
            "Bearer challenge. The tokens are shared secrets compared in constant time, not "
            "OAuth or SMART access tokens: no scopes, no expiry. GET /fhir/metadata needs no "
            f"token. {transport}"
        ),
    }


def metadata_version(accept: str | None, default: FhirVersion) -> FhirVersion | None:
    """The FHIR version an Accept header asks the CapabilityStatement in (its ``fhirVersion``
    parameter), else ``default``; None for a version ingest does not speak (406)."""
    for media_range in (accept or "").split(","):
        for param in media_range.split(";")[1:]:
            name, _, value = param.partition("=")
            if name.strip().lower() != "fhirversion":
                continue
            wanted = value.strip().strip('"')
            return next(
                (
                    version
                    for prefix, version in _MIME_VERSIONS.items()
                    if wanted == prefix or wanted.startswith(prefix + ".")
                ),
                None,
            )
    return default
