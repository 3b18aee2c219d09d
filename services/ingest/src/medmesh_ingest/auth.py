"""Who is sending: bearer tokens from configuration, and where ingest may listen without them."""

from __future__ import annotations

import hmac
from dataclasses import dataclass

import httpx

from medmesh_contracts.events import FhirVersion
from medmesh_ingest.settings import IngestSettings
from medmesh_runtime.metricsgate import is_loopback
from medmesh_runtime.smart import smart_auth


@dataclass(frozen=True)
class Source:
    """A sender ingest recognises, and how to treat what it sends."""

    name: str
    fhir_version: FhirVersion = "R4B"
    site: str | None = None
    base_url: str | None = None
    fetch_token: str | None = None
    # SMART Backend Services for fetches from base_url (one per source: it caches the token).
    fetch_auth: httpx.Auth | None = None


class Authenticator:
    """Maps an Authorization header to a configured source (constant-time token comparison)."""

    def __init__(self, settings: IngestSettings) -> None:
        self._tokens = settings.bearer_tokens()
        self._sources: dict[str, Source] = {
            name: Source(
                name,
                config.fhir_version,
                config.site,
                config.base_url,
                config.fetch_token.get_secret_value() if config.fetch_token else None,
                smart_auth(config.fetch_smart),
            )
            for name, config in settings.ingest_sources.items()
        }
        fetch_token = settings.source_token.get_secret_value() if settings.source_token else None
        self._default = Source(
            "default",
            settings.default_fhir_version,
            None,
            settings.source_base_url,
            fetch_token,
            smart_auth(settings.source_smart),
        )

    @property
    def default_source(self) -> Source:
        """The source of payloads that name none (the inbound topic, or no tokens configured)."""
        return self._default

    @property
    def required(self) -> bool:
        """Whether requests must carry a token (true as soon as one is configured)."""
        return bool(self._tokens)

    def source(self, authorization: str | None) -> Source | None:
        """The sender's source; None when a token is required and this one is not valid."""
        if not self.required:
            return self._default
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        given = token.strip().encode()
        found: str | None = None
        for known, name in self._tokens.items():
            if hmac.compare_digest(known.encode(), given):
                found = name
        if found is None:
            return None
        return self._sources.get(found, self._default)


def check_listen_address(settings: IngestSettings) -> None:
    """Refuse to serve on a non-loopback address without bearer tokens (ValueError)."""
    if not settings.bearer_tokens() and not is_loopback(settings.http_host):
        raise ValueError(
            f"ingest will not listen on {settings.http_host} without authentication: set "
            "MEDMESH_INGEST_TOKENS (or MEDMESH_INGEST_SOURCES), or listen on 127.0.0.1"
        )
