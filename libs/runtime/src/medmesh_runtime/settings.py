"""Settings every medmesh service shares; each service subclasses once with its own fields.

All variables are prefixed ``MEDMESH_`` (e.g. ``MEDMESH_KAFKA_BOOTSTRAP_SERVERS``) and are listed
in the repository's ``.env.example``.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


def _default_instance() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class ServiceSettings(BaseSettings):
    """Kafka connection, identity, HTTP port and observability settings of one service process."""

    # env_ignore_empty: `MEDMESH_TRACE_FILE=` in an env file means "unset", not the path ".".
    model_config = SettingsConfigDict(
        env_prefix="MEDMESH_", extra="ignore", frozen=True, env_ignore_empty=True
    )

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
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # Where finished spans are appended as JSON lines (for `medmesh trace`); off when unset.
    trace_file: Path | None = None
    # OTLP/HTTP traces endpoint (e.g. http://otel-collector:4318/v1/traces); off when unset.
    otlp_traces_endpoint: str | None = None
    # Share of new traces recorded; child spans follow their parent's decision (parent-based).
    trace_sample_ratio: float = Field(default=1.0, ge=0.0, le=1.0)
    model_specs_dir: Path = Path("deploy/models")
