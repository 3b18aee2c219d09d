"""Configuration of the ingest service (environment variables prefixed MEDMESH_)."""

from __future__ import annotations

from pydantic import SecretStr

from medmesh_runtime.settings import ServiceSettings

# Only for local runs and tests; `medmesh up` warns, and deployments must set their own key.
DEVELOPMENT_PSEUDONYM_KEY = "medmesh-development-key-not-for-production"


class IngestSettings(ServiceSettings):
    """Ingest: HTTP front door and the consumer of medmesh.fhir.inbound."""

    ingest_port: int = 8080
    # Keyed HMAC secret that turns patient references into pseudonyms (Kafka keys).
    pseudonym_key: SecretStr = SecretStr(DEVELOPMENT_PSEUDONYM_KEY)
    # Largest accepted HTTP body or inbound event, in bytes.
    max_payload_bytes: int = 5 * 1024 * 1024
    ingest_group_id: str = "medmesh-ingest"
