"""Settings every medmesh service shares; each service subclasses once with its own fields.

All variables are prefixed ``MEDMESH_`` (e.g. ``MEDMESH_KAFKA_BOOTSTRAP_SERVERS``) and are listed
in the repository's ``.env.example``.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def _default_instance() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


# aiokafka's producer refuses a record whose key, value and headers exceed its max_request_size,
# 1 MiB by default; medmesh keeps that default (no setting changes it) and the broker's
# message.max.bytes (1 MiB + 12 bytes by default) agrees with it.
PRODUCER_MAX_REQUEST_SIZE = 1024 * 1024
# What a dead letter's headers (correlation id, schema, W3C trace context) and the record
# framing may take at most: the value and key of a dead letter keep under the rest.
_DEAD_LETTER_HEADROOM = 16 * 1024


class DeadLetterSettings(BaseSettings):
    """How large a dead letter may be: its own class, so that the dead-letter helpers read it
    from the environment without the rest of a service's settings."""

    # env_ignore_empty (every service's settings inherit it): `MEDMESH_TRACE_FILE=` in an env
    # file means "unset", not the path ".".
    model_config = SettingsConfigDict(
        env_prefix="MEDMESH_", extra="ignore", frozen=True, env_ignore_empty=True
    )

    # The most bytes a dead letter's value (its JSON event, envelope included) and key may take.
    # A consumed record whose dead letter would be larger keeps a truncated payload with the
    # SHA-256 and size of the whole value (raw_truncated). The default leaves 48 KiB of the
    # producer's 1 MiB request for headers and framing; at most 1 MiB - 16 KiB is accepted.
    dead_letter_max_bytes: int = Field(
        default=1_000_000, ge=4096, le=PRODUCER_MAX_REQUEST_SIZE - _DEAD_LETTER_HEADROOM
    )


class ServiceSettings(DeadLetterSettings):
    """Kafka connection, identity, HTTP port and observability settings of one service process."""

    kafka_bootstrap_servers: str = "127.0.0.1:9092"
    kafka_security_protocol: Literal["PLAINTEXT", "SASL_SSL", "SSL", "SASL_PLAINTEXT"] = "PLAINTEXT"
    kafka_sasl_mechanism: Literal["SCRAM-SHA-256", "SCRAM-SHA-512", "PLAIN"] = "SCRAM-SHA-512"
    kafka_sasl_username: str | None = None
    kafka_sasl_password: str | None = None
    # Compression of every batch this process produces (requests, tasks and results carry
    # waveforms of thousands of samples); lz4, snappy and zstd come from cramjam.
    kafka_compression: Literal["none", "gzip", "snappy", "lz4", "zstd"] = "lz4"
    instance_id: str = Field(default_factory=_default_instance)
    http_host: str = "127.0.0.1"
    # HTTP hardening of every service's server (docs/deployment.md, "HTTP and TLS").
    # Seconds a client has for a request's line and headers, counted from its connecting (or from
    # the first byte of its next request on a kept-alive connection): then 408 and the connection
    # is closed. Uvicorn has no such limit; without it, one byte every few seconds holds a
    # connection forever (slowloris).
    http_header_timeout_s: float = Field(default=10.0, gt=0)
    # Seconds a client has for a request's whole body once its headers are in (then 408 and
    # close): the largest ingest payload, 5 MiB, at 100 kB/s takes about 52 s.
    http_body_timeout_s: float = Field(default=60.0, gt=0)
    # Open connections at most (each server; the metrics port shares them): one beyond is
    # answered 503 and closed before its request is read. The benchmarks open 200.
    http_max_connections: int = Field(default=512, ge=1)
    # /docs, /redoc and /openapi.json (ingest): off unless turned on, for development.
    http_docs: bool = False
    # /metrics is served on this port only (unset: on the service's own port). A service listening
    # beyond loopback serves /metrics on its own port only with a metrics token.
    metrics_port: int | None = Field(default=None, ge=1, le=65535)
    # Bearer token Prometheus must send for /metrics (unset: none is asked).
    metrics_token: SecretStr | None = None
    # TLS served by the process itself (PEM files; the key may sit in the certificate file).
    # Unset: plain HTTP, TLS being terminated in front (an Ingress or reverse proxy).
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # Where finished spans are appended as JSON lines (for `medmesh trace`); off when unset.
    trace_file: Path | None = None
    # OTLP/HTTP traces endpoint (e.g. http://otel-collector:4318/v1/traces); off when unset.
    otlp_traces_endpoint: str | None = None
    # Share of new traces recorded; child spans follow their parent's decision (parent-based).
    trace_sample_ratio: float = Field(default=1.0, ge=0.0, le=1.0)
    model_specs_dir: Path = Path("deploy/models")

    @model_validator(mode="after")
    def _tls_key_needs_a_certificate(self) -> ServiceSettings:
        if self.tls_key_file is not None and self.tls_cert_file is None:
            raise ValueError("MEDMESH_TLS_KEY_FILE is set without MEDMESH_TLS_CERT_FILE")
        return self
