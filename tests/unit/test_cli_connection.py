"""The ops commands' Kafka and HTTP targets: contexts, MEDMESH_* variables, and the security
arguments every CLI Kafka client gets."""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiokafka.errors import KafkaConnectionError
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from typer.testing import CliRunner

from medmesh_cli import models
from medmesh_cli.devstack import topics as devstack_topics
from medmesh_cli.devstack.tls import generate_tls
from medmesh_cli.main import app
from medmesh_cli.ops import commands, kafka_io
from medmesh_cli.ops.connection import (
    LOCAL_ENDPOINTS,
    Connection,
    ContextError,
    contexts_file,
    resolve,
)
from medmesh_contracts.lifecycle import LifecycleError

# Test credentials, not secrets.
FROM_VARIABLE = "from-a-variable"
FROM_FILE = "from-a-file"
PASSWORD = "pw"  # noqa: S105

PROD = """
[contexts.prod]
bootstrap_servers = "kafka.hospital.example:9094"
security_protocol = "SASL_SSL"
sasl_mechanism = "SCRAM-SHA-512"
sasl_username = "medmesh-ops"
sasl_password_env = "PROD_KAFKA_PASSWORD"

[contexts.prod.endpoints]
router = "http://127.0.0.1:18181/"
triton = "http://127.0.0.1:18000"

[contexts.filed]
bootstrap_servers = "kafka.other.example:9094"
security_protocol = "SASL_PLAINTEXT"
sasl_mechanism = "SCRAM-SHA-256"
sasl_username = "ops"
sasl_password_file = "secrets/kafka.password"
"""


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No MEDMESH_ variable of the machine running the tests leaks into a resolution."""
    for name in list(os.environ):
        if name.startswith("MEDMESH_") or name == "SSL_CERT_FILE":
            monkeypatch.delenv(name)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))


@pytest.fixture
def contexts(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A contexts file with a SASL_SSL context (password from a variable) and a SASL_PLAINTEXT
    one (password from a file beside it), named by MEDMESH_CONTEXTS_FILE."""
    path = tmp_path / "contexts.toml"
    path.write_text(PROD)
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "kafka.password").write_text("from-a-file\n")
    monkeypatch.setenv("MEDMESH_CONTEXTS_FILE", str(path))
    monkeypatch.setenv("PROD_KAFKA_PASSWORD", "from-a-variable")
    return path


def test_without_context_or_variables_the_local_stack_is_the_target() -> None:
    """Nothing set: PLAINTEXT to 127.0.0.1:9092, no security arguments, the local endpoints."""
    connection = resolve()
    assert connection.bootstrap == "127.0.0.1:9092"
    assert connection.security() == {}
    assert connection.endpoints == {}
    assert connection.endpoint("router") == LOCAL_ENDPOINTS["router"]


def test_the_services_variables_configure_the_cli(monkeypatch: pytest.MonkeyPatch) -> None:
    """MEDMESH_KAFKA_* (as the services read them) and MEDMESH_*_URL set the CLI's target."""
    monkeypatch.setenv("MEDMESH_KAFKA_BOOTSTRAP_SERVERS", "medmesh-kafka-bootstrap:9093")
    monkeypatch.setenv("MEDMESH_KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("MEDMESH_KAFKA_SASL_USERNAME", "medmesh-services")
    monkeypatch.setenv("MEDMESH_KAFKA_SASL_PASSWORD", "pw")
    monkeypatch.setenv("MEDMESH_ROUTER_URL", "http://router:8181")
    connection = resolve()
    security = connection.security()
    assert connection.bootstrap == "medmesh-kafka-bootstrap:9093"
    assert security["security_protocol"] == "SASL_SSL"
    assert security["sasl_mechanism"] == "SCRAM-SHA-512"
    assert (security["sasl_plain_username"], security["sasl_plain_password"]) == (
        "medmesh-services",
        "pw",
    )
    assert isinstance(security["ssl_context"], ssl.SSLContext)
    assert connection.endpoints == {"router": "http://router:8181"}


def test_a_context_sets_kafka_security_and_endpoints(contexts: Path) -> None:
    """A named context gives bootstrap, SASL_SSL, mechanism, user, password and endpoints."""
    connection = resolve("prod")
    security = connection.security()
    assert connection.bootstrap == "kafka.hospital.example:9094"
    assert security["security_protocol"] == "SASL_SSL"
    assert security["sasl_plain_password"] == FROM_VARIABLE
    assert connection.endpoint("router") == "http://127.0.0.1:18181"
    assert connection.endpoint("triton") == "http://127.0.0.1:18000"
    assert connection.endpoint("ingest") == LOCAL_ENDPOINTS["ingest"]


def test_a_context_password_may_come_from_a_file_beside_it(contexts: Path) -> None:
    """sasl_password_file, relative to the contexts file, is read and stripped."""
    security = resolve("filed").security()
    assert security["security_protocol"] == "SASL_PLAINTEXT"
    assert security["sasl_mechanism"] == "SCRAM-SHA-256"
    assert security["sasl_plain_password"] == FROM_FILE
    assert "ssl_context" not in security or security["ssl_context"] is None


def test_context_wins_over_variables_and_bootstrap_over_both(
    contexts: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Precedence: --bootstrap, then the context, then MEDMESH_* variables."""
    monkeypatch.setenv("MEDMESH_KAFKA_BOOTSTRAP_SERVERS", "from-env:9092")
    monkeypatch.setenv("MEDMESH_ROUTER_URL", "http://from-env:8181")
    monkeypatch.setenv("MEDMESH_REPORTING_URL", "http://reporting-env:8184")
    connection = resolve("prod")
    assert connection.bootstrap == "kafka.hospital.example:9094"
    assert connection.endpoint("router") == "http://127.0.0.1:18181"
    assert connection.endpoint("reporting") == "http://reporting-env:8184"
    assert resolve("prod", "given:9094").bootstrap == "given:9094"


def test_contexts_file_defaults_to_the_user_config_folder(tmp_path: Path) -> None:
    """Without MEDMESH_CONTEXTS_FILE the file is $XDG_CONFIG_HOME/medmesh/contexts.toml."""
    assert contexts_file({"XDG_CONFIG_HOME": str(tmp_path)}) == (
        tmp_path / "medmesh" / "contexts.toml"
    )
    assert contexts_file({"MEDMESH_CONTEXTS_FILE": "/etc/x.toml"}) == Path("/etc/x.toml")


@pytest.mark.parametrize(
    ("extra", "problem"),
    [
        ('sasl_password = "inline"', "holds a password"),
        ('sasl_pasword_env = "X"', "unknown keys"),
        ('ssl_cafile = "missing-ca.pem"', "TLS files"),
    ],
)
def test_a_bad_context_is_refused_with_the_reason(contexts: Path, extra: str, problem: str) -> None:
    """Inline passwords, misspelt keys and TLS files that do not load are refused at once."""
    contexts.write_text(
        contexts.read_text() + f'\n[contexts.bad]\nsecurity_protocol = "SSL"\n{extra}\n'
    )
    with pytest.raises(ContextError, match=problem):
        resolve("bad")


def test_unknown_context_missing_file_and_unset_password_are_refused(
    contexts: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A context not in the file, no file at all, or an unset password variable: ContextError."""
    with pytest.raises(ContextError, match=r"no context 'staging'.*known: filed, prod"):
        resolve("staging")
    monkeypatch.delenv("PROD_KAFKA_PASSWORD")
    with pytest.raises(ContextError, match="PROD_KAFKA_PASSWORD, which is unset"):
        resolve("prod")
    monkeypatch.setenv("MEDMESH_CONTEXTS_FILE", str(contexts.parent / "none.toml"))
    with pytest.raises(ContextError, match="no contexts file"):
        resolve("prod")


def test_sasl_without_credentials_is_refused_before_any_client(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """SASL_SSL without username or password fails when resolving, not in the first client."""
    monkeypatch.setenv("MEDMESH_KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    with pytest.raises(ContextError, match="needs MEDMESH_KAFKA_SASL_USERNAME"):
        resolve()


def test_a_context_ca_file_is_trusted_by_the_tls_context(contexts: Path, tmp_path: Path) -> None:
    """ssl_cafile is loaded into the services' TLS context (the CA's certificate is trusted)."""
    # A CA of its own: the test must not depend on this machine's CA bundle.
    ca = generate_tls(tmp_path / "tls").ca_cert
    (tmp_path / "ca.pem").write_bytes(ca.read_bytes())
    contexts.write_text(
        contexts.read_text()
        + '\n[contexts.tls]\nsecurity_protocol = "SSL"\nssl_cafile = "ca.pem"\n'
    )
    security = resolve("tls").security()
    assert security["security_protocol"] == "SSL"
    subject = x509.load_pem_x509_certificate(ca.read_bytes()).subject
    trusted = [
        dict(attribute for rdn in cert["subject"] for attribute in rdn)
        for cert in security["ssl_context"].get_ca_certs()
    ]
    assert {
        "organizationName": subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value,
        "commonName": subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value,
    } in trusted


def test_a_bad_context_on_the_command_line_is_a_usage_error(contexts: Path) -> None:
    """`medmesh dlq list --context nope` exits 2 naming the problem, without touching Kafka."""
    result = CliRunner().invoke(app, ["dlq", "list", "--context", "nope"])
    assert result.exit_code == 2
    assert "no context 'nope'" in result.output


class _Client:
    """Stands in for an aiokafka client: records its arguments, starts and stops."""

    made: list[tuple[str, dict[str, Any]]]

    def __init__(self, *topics: str, **kwargs: Any) -> None:
        _Client.made.append((type(self).__name__, kwargs))

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def list_consumer_groups(self) -> list[tuple[str, str]]:
        return []

    async def list_topics(self) -> list[str]:
        return ["medmesh.model.m.v1.tasks"]


class FakeConsumer(_Client):
    """A consumer."""


class FakeProducer(_Client):
    """A producer."""


class FakeAdmin(_Client):
    """An admin client."""


@pytest.fixture
def clients(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, dict[str, Any]]]:
    """Every aiokafka client the CLI builds is a fake that records its arguments."""
    made: list[tuple[str, dict[str, Any]]] = []
    _Client.made = made
    for module in (kafka_io, models):
        monkeypatch.setattr(module, "AIOKafkaConsumer", FakeConsumer)
    for module in (kafka_io, models):
        monkeypatch.setattr(module, "AIOKafkaProducer", FakeProducer)
    monkeypatch.setattr(kafka_io, "AIOKafkaAdminClient", FakeAdmin)
    monkeypatch.setattr(devstack_topics, "AIOKafkaAdminClient", FakeAdmin)

    async def no_partitions(_consumer: Any, _topic: str) -> list[Any]:
        return []

    monkeypatch.setattr(models, "topic_partitions", no_partitions)
    return made


def _sasl_ssl(monkeypatch: pytest.MonkeyPatch) -> Connection:
    monkeypatch.setenv("MEDMESH_KAFKA_BOOTSTRAP_SERVERS", "secure:9093")
    monkeypatch.setenv("MEDMESH_KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("MEDMESH_KAFKA_SASL_USERNAME", "medmesh-services")
    monkeypatch.setenv("MEDMESH_KAFKA_SASL_PASSWORD", "pw")
    return resolve()


def test_every_cli_kafka_client_gets_the_security_arguments(
    monkeypatch: pytest.MonkeyPatch, clients: list[tuple[str, dict[str, Any]]]
) -> None:
    """dlq/status consumers, producers and admin, and the models commands' registry reader,
    writer and topic creation all connect with bootstrap, SASL_SSL and credentials."""
    connection = _sasl_ssl(monkeypatch)

    async def build_all() -> None:
        async with kafka_io.consumer(connection, group_id="g"):
            pass
        async with kafka_io.producer(connection):
            pass
        await kafka_io.group_lags(connection)
        with pytest.raises(LifecycleError):
            await models.read_registry(connection)
        await models.ensure_task_topic(connection, "m", 1)

    asyncio.run(build_all())
    kinds = [kind for kind, _ in clients]
    assert kinds == [
        "FakeConsumer",  # kafka_io.consumer
        "FakeProducer",  # kafka_io.producer
        "FakeAdmin",  # group_lags
        "FakeConsumer",  # group_lags' end offsets
        "FakeConsumer",  # read_registry
        "FakeConsumer",  # ensure_task_topic: partitions of the requests topic
        "FakeAdmin",  # create_topics
    ]
    for kind, kwargs in clients:
        assert kwargs["bootstrap_servers"] == "secure:9093", kind
        assert kwargs["security_protocol"] == "SASL_SSL", kind
        assert kwargs["sasl_mechanism"] == "SCRAM-SHA-512", kind
        assert kwargs["sasl_plain_username"] == "medmesh-services", kind
        assert kwargs["sasl_plain_password"] == PASSWORD, kind
        assert isinstance(kwargs["ssl_context"], ssl.SSLContext), kind


def test_models_write_change_accepts_a_bootstrap_address(
    clients: list[tuple[str, dict[str, Any]]],
) -> None:
    """A bare bootstrap address (tests, the local stack) still works: PLAINTEXT, no security."""
    with pytest.raises(LifecycleError):
        asyncio.run(models.read_registry("127.0.0.1:29092"))
    assert clients == [
        ("FakeConsumer", {"bootstrap_servers": "127.0.0.1:29092", "enable_auto_commit": False})
    ]


def test_status_checks_the_configured_endpoints_not_loopback(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With MEDMESH_*_URL set, `status` checks those services (Triton on its health API)."""
    monkeypatch.setenv("MEDMESH_INGEST_URL", "http://ingest:8080")
    monkeypatch.setenv("MEDMESH_TRITON_HTTP_URL", "http://triton:8000")
    asked: list[str] = []

    class Answer:
        is_success = True

    def get(url: str, timeout: float) -> Answer:
        asked.append(url)
        return Answer()

    monkeypatch.setattr(httpx, "get", get)
    assert commands.service_endpoints(resolve()) == {
        "ingest": "http://ingest:8080",
        "triton": "http://triton:8000",
    }
    assert commands._ready("ingest", "http://ingest:8080")
    assert commands._ready("triton", "http://triton:8000")
    assert asked == ["http://ingest:8080/readyz", "http://triton:8000/v2/health/ready"]


def _client_certificate(path: Path) -> None:
    """A self-signed client certificate for CN=ops-alice, O=Example Hospital (its key beside it,
    .key)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, "ops-alice"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Example Hospital"),
        ]
    )
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path.with_suffix(".key").write_bytes(key_pem)


def test_the_audit_actor_is_the_principal_the_broker_authenticates(
    contexts: Path, tmp_path: Path
) -> None:
    """SASL: the SASL user; a client certificate: its subject DN (Kafka's SSL principal);
    PLAINTEXT: the OS user, marked unauthenticated."""
    assert resolve("prod").principal() == "sasl:medmesh-ops"
    assert resolve("filed").principal() == "sasl:ops"
    _client_certificate(tmp_path / "client.pem")
    contexts.write_text(
        contexts.read_text()
        + '\n[contexts.mtls]\nsecurity_protocol = "SSL"\nssl_certfile = "client.pem"\n'
        + 'ssl_keyfile = "client.key"\n'
    )
    assert resolve("mtls").principal() == "mtls:O=Example Hospital,CN=ops-alice"
    assert resolve().principal().startswith("unauthenticated:")


class RefusedConsumer(_Client):
    """A consumer whose broker refuses the login: aiokafka logs why, then raises a bare
    'Unable to bootstrap'."""

    stopped = 0

    async def start(self) -> None:
        logging.getLogger("aiokafka.client").error(
            'Unable connect to "kafka.hospital.example:9094": [Error 58] SaslAuthenticationFailed:'
            " Authentication failed during authentication due to invalid credentials"
        )
        raise KafkaConnectionError("Unable to bootstrap from [('kafka.hospital.example', 9094)]")

    async def stop(self) -> None:
        RefusedConsumer.stopped += 1


@pytest.mark.parametrize(
    "command", [["dlq", "list"], ["models", "history", "m"], ["models", "pause", "m"]]
)
def test_a_refused_login_ends_the_command_with_the_reason_not_a_traceback(
    contexts: Path,
    clients: list[tuple[str, dict[str, Any]]],
    monkeypatch: pytest.MonkeyPatch,
    command: list[str],
) -> None:
    """A broker that refuses the credentials: exit 1, one line naming the broker, the security
    in use and aiokafka's reason; no traceback, no password, the failed client closed."""
    for module in (kafka_io, models):
        monkeypatch.setattr(module, "AIOKafkaConsumer", RefusedConsumer)
    RefusedConsumer.stopped = 0
    result = CliRunner().invoke(app, [*command, "--context", "prod"])
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit)
    assert (
        "Kafka at kafka.hospital.example:9094 (context 'prod': SASL_SSL, SCRAM-SHA-512 as"
        " medmesh-ops, CA of the system store) refused or unreachable:"
    ) in result.output
    assert "SaslAuthenticationFailed" in result.output
    assert FROM_VARIABLE not in result.output
    assert RefusedConsumer.stopped == 1
