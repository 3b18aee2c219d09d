"""Where the ops commands connect: Kafka, with the services' own security settings, and the
services' HTTP endpoints.

Every Kafka client of ``medmesh models``, ``medmesh dlq`` and ``medmesh status`` is built from one
``Connection``. Its Kafka settings are the services' (``medmesh_runtime.settings.ServiceSettings``:
``MEDMESH_KAFKA_BOOTSTRAP_SERVERS``, ``_SECURITY_PROTOCOL``, ``_SASL_MECHANISM``,
``_SASL_USERNAME``, ``_SASL_PASSWORD``) turned into client arguments by the services' own
``medmesh_runtime.kafka.aiokafka_security``, so a command reaches whatever Kafka a service of the
same environment reaches (inside a pod or container: the same variables, and the CA of
``SSL_CERT_FILE``).

From a workstation, ``--context NAME`` (or ``MEDMESH_CONTEXT``) names a context of the contexts
file (``MEDMESH_CONTEXTS_FILE``, default ``$XDG_CONFIG_HOME/medmesh/contexts.toml``, i.e.
``~/.config/medmesh/contexts.toml``)::

    [contexts.prod]
    bootstrap_servers = "kafka.hospital.example:9094"
    security_protocol = "SASL_SSL"                 # PLAINTEXT | SSL | SASL_SSL | SASL_PLAINTEXT
    sasl_mechanism = "SCRAM-SHA-512"               # SCRAM-SHA-256 | PLAIN
    sasl_username = "medmesh-ops"
    sasl_password_env = "MEDMESH_PROD_KAFKA_PASSWORD"   # or sasl_password_file = "~/.../password"
    ssl_cafile = "~/.config/medmesh/prod-ca.crt"   # the brokers' CA (else the system store)
    # ssl_certfile, ssl_keyfile: a client certificate, for listeners that ask for one

    [contexts.prod.endpoints]                      # base URLs of the services' HTTP ports
    router = "http://127.0.0.1:18181"
    triton = "http://127.0.0.1:18000"
    ingest = "http://127.0.0.1:18080"
    reporting = "http://127.0.0.1:18184"
    jaeger = "http://127.0.0.1:16686"              # Jaeger's query service (`medmesh trace`)
    # tempo = "http://127.0.0.1:3200"              # or Grafana Tempo's HTTP API (wins over jaeger)

What a context sets wins over the ``MEDMESH_*`` variables; what it leaves out comes from them
(then the defaults: the local stack of ``medmesh up``). A ``--bootstrap`` option wins over both.
Passwords never sit in the file: only the name of a variable or of a file that holds them.
"""

from __future__ import annotations

import asyncio
import getpass
import logging
import os
import socket
import sys
import tomllib
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, TextIO, TypeVar

import typer
from aiokafka.errors import KafkaError
from cryptography import x509
from pydantic import ValidationError

from medmesh_runtime.kafka import aiokafka_security
from medmesh_runtime.settings import ServiceSettings

T = TypeVar("T")

CONTEXTS_FILE_VARIABLE = "MEDMESH_CONTEXTS_FILE"
CONTEXT_VARIABLE = "MEDMESH_CONTEXT"

# The local stack of `medmesh up` (devstack.stack.StackPorts), used when nothing else is set.
LOCAL_ENDPOINTS: dict[str, str] = {
    "ingest": "http://127.0.0.1:8080",
    "router": "http://127.0.0.1:8181",
    "reporting": "http://127.0.0.1:8184",
    "triton": "http://127.0.0.1:8000",
}

# A context's keys and the settings field each one sets.
_SETTING_KEYS = {
    "bootstrap_servers": "kafka_bootstrap_servers",
    "security_protocol": "kafka_security_protocol",
    "sasl_mechanism": "kafka_sasl_mechanism",
    "sasl_username": "kafka_sasl_username",
}
_FILE_KEYS = ("ssl_cafile", "ssl_certfile", "ssl_keyfile")
_KNOWN_KEYS = {
    *_SETTING_KEYS,
    *_FILE_KEYS,
    "sasl_password_env",
    "sasl_password_file",
    "endpoints",
}


class ContextError(ValueError):
    """A context that cannot be used: a missing file or context, an unknown key, a password
    whose variable or file is not there, settings Kafka clients cannot be built from."""


class CliSettings(ServiceSettings):
    """The services' settings (Kafka connection and security above all) plus what only the ops
    commands read: the services' base URLs (``MEDMESH_INGEST_URL``, ``MEDMESH_ROUTER_URL``,
    ``MEDMESH_REPORTING_URL``, ``MEDMESH_TRITON_HTTP_URL``) and the brokers' CA and a client
    certificate (``MEDMESH_KAFKA_SSL_CAFILE``, ``_CERTFILE``, ``_KEYFILE``; the services trust
    the CA of ``SSL_CERT_FILE`` instead, which the commands do too)."""

    ingest_url: str | None = None
    router_url: str | None = None
    reporting_url: str | None = None
    triton_http_url: str | None = None
    # Jaeger's query service (`medmesh trace` reads a deployment's traces there).
    jaeger_url: str | None = None
    # Or Grafana Tempo's HTTP API (`medmesh trace` asks Tempo when both are set).
    tempo_url: str | None = None
    kafka_ssl_cafile: Path | None = None
    kafka_ssl_certfile: Path | None = None
    kafka_ssl_keyfile: Path | None = None


@dataclass(frozen=True)
class Connection:
    """Resolved settings of one command: Kafka client arguments and the services' endpoints."""

    settings: CliSettings
    # Base URL per service name: the context's and the MEDMESH_*_URL variables' (empty: none set).
    endpoints: dict[str, str] = field(default_factory=dict)
    context: str | None = None

    @property
    def bootstrap(self) -> str:
        """The Kafka bootstrap servers."""
        return self.settings.kafka_bootstrap_servers

    def principal(self) -> str:
        """Who the broker authenticates this command as (the audit trail's actor):
        ``sasl:<user>`` with SASL, ``mtls:<subject DN>`` with a client certificate (Kafka's own
        SSL principal), else ``unauthenticated:<OS user>@<host>``: over PLAINTEXT (the dev stack)
        the broker checks no one, and the record says so."""
        settings = self.settings
        if settings.kafka_security_protocol.startswith("SASL_") and settings.kafka_sasl_username:
            return f"sasl:{settings.kafka_sasl_username}"
        if settings.kafka_ssl_certfile is not None:
            try:
                pem = settings.kafka_ssl_certfile.read_bytes()
                subject = x509.load_pem_x509_certificate(pem).subject.rfc4514_string()
            except (OSError, ValueError) as exc:
                raise ContextError(f"the client certificate names no subject: {exc}") from exc
            return f"mtls:{subject}"
        return f"unauthenticated:{getpass.getuser()}@{socket.gethostname()}"

    def security(self) -> dict[str, Any]:
        """Security arguments of a plain aiokafka client (consumer, producer, admin): the
        services' own (``aiokafka_security``), with the context's CA and client certificate
        loaded into its TLS context."""
        options = aiokafka_security(self.settings)
        ssl_context = options.get("ssl_context")
        settings = self.settings
        files = (settings.kafka_ssl_cafile, settings.kafka_ssl_certfile, settings.kafka_ssl_keyfile)
        if ssl_context is None:
            if any(files):
                raise ContextError(
                    "ssl_cafile, ssl_certfile and ssl_keyfile need security_protocol SSL or"
                    f" SASL_SSL, not {settings.kafka_security_protocol}"
                )
            return options
        try:
            if settings.kafka_ssl_cafile is not None:
                ssl_context.load_verify_locations(cafile=settings.kafka_ssl_cafile)
            if settings.kafka_ssl_certfile is not None:
                ssl_context.load_cert_chain(settings.kafka_ssl_certfile, settings.kafka_ssl_keyfile)
            elif settings.kafka_ssl_keyfile is not None:
                raise ContextError("ssl_keyfile is set without ssl_certfile")
        except OSError as exc:  # a missing or unreadable PEM file (ssl.SSLError is an OSError)
            raise ContextError(f"TLS files of the Kafka connection: {exc}") from exc
        return options

    def kafka(self, **options: Any) -> dict[str, Any]:
        """Every argument of a plain aiokafka client: bootstrap servers, security, ``options``."""
        return {"bootstrap_servers": self.bootstrap, **self.security(), **options}

    def endpoint(self, service: str) -> str:
        """The base URL of a service (``ingest``, ``router``, ``reporting``, ``triton``, or any
        name a context lists): configured, else the local stack's."""
        if service in self.endpoints:
            return self.endpoints[service]
        if service in LOCAL_ENDPOINTS:
            return LOCAL_ENDPOINTS[service]
        raise ContextError(f"no endpoint for {service!r}: add it to the context's endpoints")


def contexts_file(environ: Mapping[str, str] | None = None) -> Path:
    """The contexts file: ``MEDMESH_CONTEXTS_FILE``, else ``medmesh/contexts.toml`` in
    ``XDG_CONFIG_HOME`` (default ``~/.config``)."""
    env = os.environ if environ is None else environ
    given = env.get(CONTEXTS_FILE_VARIABLE)
    if given:
        return Path(given).expanduser()
    config_home = env.get("XDG_CONFIG_HOME") or str(Path("~/.config").expanduser())
    return Path(config_home) / "medmesh" / "contexts.toml"


def _path(value: Any, key: str, base: Path) -> Path:
    if not isinstance(value, str) or not value:
        raise ContextError(f"{key} must be a path")
    path = Path(value).expanduser()
    return path if path.is_absolute() else base / path


def _read_contexts(path: Path) -> dict[str, Any]:
    try:
        document = tomllib.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ContextError(
            f"no contexts file at {path} (set {CONTEXTS_FILE_VARIABLE}, or create it:"
            " docs/deployment.md, 'Operating a deployment')"
        ) from exc
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ContextError(f"the contexts file {path} does not read: {exc}") from exc
    contexts = document.get("contexts", {})
    if not isinstance(contexts, dict):
        raise ContextError(f"the contexts file {path}: `contexts` must be a table")
    return contexts


def _password(entry: dict[str, Any], where: str, base: Path, env: Mapping[str, str]) -> str | None:
    """The SASL password a context names (a variable or a file), or None."""
    if "sasl_password" in entry:
        raise ContextError(
            f"{where} holds a password: name its variable (sasl_password_env) or a file"
            " (sasl_password_file) instead"
        )
    if "sasl_password_env" in entry and "sasl_password_file" in entry:
        raise ContextError(f"{where}: set sasl_password_env or sasl_password_file, not both")
    if "sasl_password_env" in entry:
        variable = str(entry["sasl_password_env"])
        if not env.get(variable):
            raise ContextError(f"{where} takes the Kafka password from {variable}, which is unset")
        return env[variable]
    if "sasl_password_file" in entry:
        secret = _path(entry["sasl_password_file"], "sasl_password_file", base)
        try:
            return secret.read_text().strip()
        except OSError as exc:
            raise ContextError(f"{where}: the password file does not read: {exc}") from exc
    return None


def context_overrides(
    name: str, path: Path, environ: Mapping[str, str] | None = None
) -> tuple[dict[str, Any], dict[str, str]]:
    """The settings (``CliSettings`` field names) and endpoints context ``name`` of the contexts
    file ``path`` sets. Relative paths in it are relative to the file's folder."""
    env = os.environ if environ is None else environ
    contexts = _read_contexts(path)
    entry = contexts.get(name)
    if not isinstance(entry, dict):
        raise ContextError(
            f"no context {name!r} in {path} (known: {', '.join(sorted(contexts)) or 'none'})"
        )
    where = f"context {name!r} of {path}"
    password = _password(entry, where, path.parent, env)
    unknown = sorted(set(entry) - _KNOWN_KEYS)
    if unknown:
        raise ContextError(f"{where}: unknown keys {unknown}; known: {sorted(_KNOWN_KEYS)}")
    overrides: dict[str, Any] = {
        target: entry[key] for key, target in _SETTING_KEYS.items() if key in entry
    }
    for key in _FILE_KEYS:
        if key in entry:
            overrides[f"kafka_{key}"] = _path(entry[key], key, path.parent)
    if password is not None:
        overrides["kafka_sasl_password"] = password
    endpoints = entry.get("endpoints", {})
    if not isinstance(endpoints, dict) or not all(
        isinstance(url, str) for url in endpoints.values()
    ):
        raise ContextError(f"{where}: endpoints must map service names to base URLs")
    return overrides, {service: url.rstrip("/") for service, url in endpoints.items()}


def _env_endpoints(settings: CliSettings) -> dict[str, str]:
    named = {
        "ingest": settings.ingest_url,
        "router": settings.router_url,
        "reporting": settings.reporting_url,
        "triton": settings.triton_http_url,
        "jaeger": settings.jaeger_url,
        "tempo": settings.tempo_url,
    }
    return {service: url.rstrip("/") for service, url in named.items() if url}


def resolve(
    context: str | None = None,
    bootstrap: str | None = None,
    *,
    environ: Mapping[str, str] | None = None,
) -> Connection:
    """The connection of one command: ``--bootstrap`` over the context over the ``MEDMESH_*``
    variables over the defaults. Checked at once: a SASL protocol without credentials, or TLS
    files that do not load, fail here rather than in the first client."""
    overrides: dict[str, Any] = {}
    endpoints: dict[str, str] = {}
    if context:
        overrides, endpoints = context_overrides(context, contexts_file(environ), environ)
    if bootstrap:
        overrides["kafka_bootstrap_servers"] = bootstrap
    try:
        settings = CliSettings(**overrides)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        raise ContextError(f"the Kafka settings are not valid: {problems}") from exc
    connection = Connection(settings, {**_env_endpoints(settings), **endpoints}, context)
    try:
        connection.security()
    except ContextError:
        raise
    except ValueError as exc:  # aiokafka_security: SASL without username or password
        where = f"context {context!r}" if context else "the MEDMESH_KAFKA_* settings"
        raise ContextError(f"{where}: {exc}") from exc
    return connection


# The options every ops command takes (typer).
ContextOption = Annotated[
    str | None,
    typer.Option(
        "--context",
        envvar=CONTEXT_VARIABLE,
        help="a context of the contexts file (MEDMESH_CONTEXTS_FILE, default"
        " ~/.config/medmesh/contexts.toml): Kafka, its security and the services' URLs",
        show_default=False,
    ),
]
BootstrapOption = Annotated[
    str | None,
    typer.Option(
        "--bootstrap",
        help="Kafka bootstrap servers (default: the context's, else"
        " MEDMESH_KAFKA_BOOTSTRAP_SERVERS, else 127.0.0.1:9092)",
        show_default=False,
    ),
]


def connect(context: str | None, bootstrap: str | None = None) -> Connection:
    """``resolve`` for a command: a problem is printed as a usage error (exit 2)."""
    try:
        return resolve(context, bootstrap)
    except ContextError as exc:
        raise typer.BadParameter(str(exc), param_hint="--context / MEDMESH_KAFKA_*") from exc


def as_connection(kafka: Connection | str) -> Connection:
    """A connection as it is, or a bootstrap address with the ``MEDMESH_*`` settings (what the
    local stack and the tests pass)."""
    return kafka if isinstance(kafka, Connection) else resolve(None, kafka)


class _KafkaReasons(logging.StreamHandler[TextIO]):
    """aiokafka's warnings and errors on stderr, as Python's last-resort handler shows them
    without any handler, keeping the last error: the only place aiokafka says why it could not
    connect (a refused SCRAM login, a certificate that does not verify); its exception says
    only "Unable to bootstrap"."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)
        self.setLevel(logging.WARNING)
        self.last_error: str | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.ERROR:
            self.last_error = record.getMessage()
        super().emit(record)


def describe(connection: Connection) -> str:
    """Which Kafka a command talks to, and how (never the password)."""
    settings = connection.settings
    protocol = settings.kafka_security_protocol
    how: str = protocol
    if protocol.startswith("SASL_"):
        how += f", {settings.kafka_sasl_mechanism} as {settings.kafka_sasl_username}"
    if protocol in ("SSL", "SASL_SSL"):
        how += f", CA {settings.kafka_ssl_cafile or 'of the system store'}"
    # A broker that requires client certificates only closes the connection on a missing or
    # untrusted one (TLS 1.3 checks it after the client's handshake): say which was sent.
    if settings.kafka_ssl_certfile is not None:
        how += f", client certificate {settings.kafka_ssl_certfile}"
    elif protocol == "SSL":
        how += ", no client certificate"
    where = f"context {connection.context!r}: " if connection.context else ""
    return f"Kafka at {connection.bootstrap} ({where}{how})"


def run_kafka(connection: Connection, work: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(work)``; a Kafka that cannot be reached, or refuses the command's
    credentials or certificate, ends the command with one line naming the broker, the security
    in use and aiokafka's reason (exit 1), not a traceback."""
    reasons = _KafkaReasons()
    logger = logging.getLogger("aiokafka")
    logger.addHandler(reasons)
    try:
        return asyncio.run(work)
    except KafkaError as exc:
        reason = reasons.last_error or f"{type(exc).__name__}: {exc}"
        typer.secho(f"{describe(connection)} refused or unreachable: {reason}", fg="red", err=True)
        raise typer.Exit(1) from exc
    finally:
        logger.removeHandler(reasons)
