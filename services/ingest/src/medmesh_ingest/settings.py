"""Configuration of the ingest service (environment variables prefixed MEDMESH_)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from medmesh_contracts.topics import READINGS_RETENTION_HOURS
from medmesh_ingest.imaging import PacsPolicy
from medmesh_runtime.settings import ServiceSettings
from medmesh_runtime.smart import SmartClientSettings

# Only for local runs and tests (MEDMESH_ENVIRONMENT=development, as `medmesh up` sets it).
DEVELOPMENT_PSEUDONYM_KEY = "medmesh-development-key-not-for-production"
# Every pseudonym key published in this repository: the default above, .env.example's and
# deploy/k8s/secret.example.yaml's placeholders. Anyone can recompute pseudonyms made with one
# from a guessed patient reference, so ingest refuses them outside development.
PUBLISHED_PSEUDONYM_KEYS = frozenset(
    {
        DEVELOPMENT_PSEUDONYM_KEY,
        "change-me-to-a-long-random-secret",
        "replace-with-at-least-32-random-bytes",
    }
)
# The shortest key HMAC-SHA256 pseudonyms accept (medmesh_ingest.pseudonym), in any environment.
MIN_PSEUDONYM_KEY_BYTES = 16
# Default bound of the readings state's memory. Measured per patient's state (tracemalloc,
# `python -m medmesh_cli.bench.state_memory --patients 2000`, docs/deployment.md "State memory"):
# about 11 KB for deterioration (7 vital signs) and 84 KB for ecg-rhythm (one 10 s lead, 2500
# samples), so 128 MiB holds some 11,000 vitals or 1,600 ECG states: a quarter of the 512 MiB
# container limit, leaving the rest to the interpreter (~80 MiB) and payloads in flight.
READINGS_MAX_BYTES = 128 * 1024 * 1024


class SourceSettings(BaseModel):
    """One hospital system allowed to send FHIR, recognised by its bearer token."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    token: SecretStr
    # The FHIR version it speaks when its content type names none.
    fhir_version: Literal["R4", "R4B", "R5"] = "R4B"
    site: str | None = None
    # Its FHIR server: id-only Subscription notifications are fetched from here, with this token.
    base_url: str | None = None
    fetch_token: SecretStr | None = None
    # Or SMART Backend Services (client credentials, signed JWT) for those fetches.
    fetch_smart: SmartClientSettings | None = None
    # Its PACS: the DICOMweb base of its ImagingStudies that name no dicom-wado-rs Endpoint
    # (one of MEDMESH_PACS_URLS).
    dicomweb_url: str | None = None


class IngestSettings(ServiceSettings):
    """Ingest: HTTP front door and the consumer of medmesh.fhir.inbound."""

    ingest_port: int = 8080
    # "development" lets ingest start with a pseudonym key published in this repository (local
    # runs and tests only: `medmesh up` sets it); any deployment leaves it "production".
    environment: Literal["production", "development"] = "production"
    # Keyed HMAC secret that turns patient references into pseudonyms (Kafka keys): at least 16
    # bytes, and outside development none of PUBLISHED_PSEUDONYM_KEYS (check_pseudonym_key).
    pseudonym_key: SecretStr = SecretStr(DEVELOPMENT_PSEUDONYM_KEY)
    # Largest accepted HTTP body or inbound event, in bytes.
    max_payload_bytes: int = 5 * 1024 * 1024
    # Deepest JSON nesting and most Bundle entries accepted (413 beyond).
    max_json_depth: int = Field(default=32, ge=4)
    max_bundle_entries: int = Field(default=1000, ge=1)
    # Most points one waveform (SampledData, e.g. an ECG lead) may hold (413 beyond).
    max_waveform_samples: int = Field(default=60_000, ge=2)
    # Longest signal one waveform may carry, (points - 1) x its sampling period, in seconds
    # (413 beyond): an hour holds any ECG strip or rhythm recording a model reads the end of,
    # and refuses a "waveform" of points hours apart.
    max_waveform_seconds: float = Field(default=3600.0, gt=0)
    # Most JSON objects and arrays one payload may hold, counted before it is decoded (413
    # beyond): a 1000-entry vitals Bundle holds about 13,000; millions of empty lists in a 5 MiB
    # body would otherwise take hundreds of MiB to decode and check.
    max_json_nodes: int = Field(default=100_000, ge=1)
    ingest_group_id: str = "medmesh-ingest"
    # Inbound events handled per poll at most (one transaction per inbound partition and poll).
    inbound_max_batch: int = 200
    # Bearer tokens accepted on /fhir, comma-separated (sources speaking the default version).
    # Without any token (here or in ingest_sources) ingest only listens on loopback.
    ingest_tokens: SecretStr = SecretStr("")
    # Named sources with their own token, FHIR version, site and FHIR server (JSON object).
    ingest_sources: dict[str, SourceSettings] = Field(default_factory=dict)
    # FHIR version of payloads whose content type and source name none.
    default_fhir_version: Literal["R4", "R4B", "R5"] = "R4B"
    # FHIR server to fetch id-only notification content from, for sources without their own.
    source_base_url: str | None = None
    source_token: SecretStr | None = None
    # Or SMART Backend Services for it (JSON: token_url, client_id, private_key_file, scope...).
    source_smart: SmartClientSettings | None = None
    # DICOMweb bases (comma-separated) an ImagingStudy's dicom-wado-rs Endpoint may name; the
    # first is the base of studies that name none, unless their source has its own
    # (``dicomweb_url`` in MEDMESH_INGEST_SOURCES). A study naming another is refused: an event
    # never makes the worker call a host not listed here (the worker has the same allowlist).
    pacs_urls: str = ""
    fetch_timeout_s: float = Field(default=10.0, gt=0)
    max_fetched_resources: int = Field(default=100, ge=1)
    # How long ingest waits for Kafka's acknowledgement before answering 503, and the
    # Retry-After it suggests then.
    publish_timeout_s: float = Field(default=10.0, gt=0)
    retry_after_s: int = Field(default=5, ge=1)
    # Readings older than this before a patient's newest reading no longer count.
    readings_lookback_minutes: int = Field(default=240, ge=1)
    # A patient's state not updated for this long is forgotten (memory and, through the topic's
    # retention.ms, medmesh.ingest.readings); at least the lookback. Raise the topic's
    # retention with it.
    readings_retention_hours: float = Field(default=READINGS_RETENTION_HOURS, gt=0)
    # Most memory the readings state may take, by ``state_bytes``' estimate (see
    # READINGS_MAX_BYTES). Beyond it the least recently updated states are evicted from memory
    # (counted in medmesh_ingest_readings_evicted_total, logged without patient data): they
    # stay on medmesh.ingest.readings, but an evicted patient's next reading merges without
    # the old ones. Raise it with the container's memory limit.
    readings_max_bytes: int = Field(default=READINGS_MAX_BYTES, ge=16 * 1024 * 1024)
    # Read medmesh.ingest.readings to its end before serving (off only for in-memory tests).
    rebuild_readings_on_start: bool = True

    @model_validator(mode="after")
    def _source_pacs_are_allowed(self) -> IngestSettings:
        allowed = PacsPolicy.from_setting(self.pacs_urls)
        for name, source in self.ingest_sources.items():
            if source.dicomweb_url is not None and allowed.allows(source.dicomweb_url) is None:
                raise ValueError(
                    f"source {name!r}: its dicomweb_url must be one of MEDMESH_PACS_URLS "
                    "(the workers fetch only from those)"
                )
        return self

    def pacs_policy(self) -> PacsPolicy:
        """Where image readings may be fetched from: MEDMESH_PACS_URLS, and each source's own
        default base."""
        return PacsPolicy.from_setting(self.pacs_urls).with_sources(
            {
                name: source.dicomweb_url
                for name, source in self.ingest_sources.items()
                if source.dicomweb_url is not None
            }
        )

    @model_validator(mode="after")
    def _retention_covers_the_lookback(self) -> IngestSettings:
        if self.readings_retention_hours * 60 < self.readings_lookback_minutes:
            raise ValueError(
                "MEDMESH_READINGS_RETENTION_HOURS must cover MEDMESH_READINGS_LOOKBACK_MINUTES"
            )
        return self

    def bearer_tokens(self) -> dict[str, str]:
        """Every accepted token, mapped to its source's name."""
        tokens = {
            token.strip(): "default"
            for token in self.ingest_tokens.get_secret_value().split(",")
            if token.strip()
        }
        tokens.update(
            {source.token.get_secret_value(): name for name, source in self.ingest_sources.items()}
        )
        return tokens


def check_pseudonym_key(settings: IngestSettings) -> None:
    """Refuse (ValueError) a pseudonym key shorter than 16 bytes and, unless
    MEDMESH_ENVIRONMENT is development, one published in this repository."""
    key = settings.pseudonym_key.get_secret_value()
    if len(key.encode()) < MIN_PSEUDONYM_KEY_BYTES:
        raise ValueError(
            f"MEDMESH_PSEUDONYM_KEY must be at least {MIN_PSEUDONYM_KEY_BYTES} bytes: set a "
            "random secret, e.g. `openssl rand -base64 48`"
        )
    if settings.environment != "development" and key.strip() in PUBLISHED_PSEUDONYM_KEYS:
        raise ValueError(
            "MEDMESH_PSEUDONYM_KEY is a placeholder published in the medmesh repository, so "
            "anyone could recompute patients' pseudonyms: set a random secret, e.g. `openssl "
            "rand -base64 48` (MEDMESH_ENVIRONMENT=development allows it for local runs only)"
        )
