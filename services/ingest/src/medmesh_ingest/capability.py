"""The CapabilityStatement ingest answers at GET /fhir/metadata."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from medmesh_contracts.modelspec import ModelSpec


def capability_statement(specs: Iterable[ModelSpec], published: datetime) -> dict[str, Any]:
    """What this endpoint accepts: R4B JSON, Bundles and the resource types models consume."""
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
        "fhirVersion": "4.3.0",
        "format": ["application/fhir+json", "application/json"],
        "rest": [
            {
                "mode": "server",
                "documentation": (
                    "POST a Bundle (collection, batch, transaction, message, or a Subscription "
                    "notification: R4B backport history Bundle, R5 subscription-notification "
                    "with fhirVersion=5.0) to /fhir or one resource to /fhir/{type}, with "
                    "Authorization: Bearer when tokens are configured. 202 means the inference "
                    "request is durably in Kafka; 503 with Retry-After means retry."
                ),
                "resource": [
                    {"type": t, "interaction": [{"code": "create"}]}
                    for t in ("Observation", "ServiceRequest", "Patient", "Encounter", "Bundle")
                ],
                "interaction": [{"code": "batch"}, {"code": "transaction"}],
            }
        ],
    }
