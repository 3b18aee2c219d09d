"""The local broker's optional SASL_SSL listener: its server.properties, the SCRAM users of the
storage format, and the throwaway CA's certificates (devstack.kafka, devstack.tls)."""

from __future__ import annotations

import socket
import ssl
import threading
from pathlib import Path

import pytest

from medmesh_cli.devstack.kafka import (
    KafkaConfig,
    keystore_pem,
    scram_arguments,
    server_properties,
)
from medmesh_cli.devstack.tls import TlsFiles, generate_tls


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    """A CA and a loopback server certificate, generated once for the module."""
    return generate_tls(tmp_path_factory.mktemp("tls"))


def _properties(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if line)


def test_without_a_sasl_port_the_broker_is_plaintext_only(tmp_path: Path) -> None:
    """The default broker (medmesh up, e2e, chaos) has PLAINTEXT and CONTROLLER only."""
    config = KafkaConfig(data_dir=tmp_path, port=9092, controller_port=9093)
    props = _properties(server_properties(config, tmp_path / "logs"))
    assert props["listeners"] == "PLAINTEXT://127.0.0.1:9092,CONTROLLER://127.0.0.1:9093"
    assert props["advertised.listeners"] == "PLAINTEXT://127.0.0.1:9092"
    assert props["listener.security.protocol.map"] == "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT"
    assert not [key for key in props if "sasl" in key or "ssl" in key]
    assert scram_arguments(config) == []


def test_a_sasl_ssl_listener_is_added_beside_plaintext(tmp_path: Path, tls: TlsFiles) -> None:
    """A SASL_SSL port adds a SCRAM-SHA-512 listener with a PEM keystore; the broker's own
    traffic (inter-broker, controller) stays PLAINTEXT."""
    config = KafkaConfig(data_dir=tmp_path, sasl_ssl_port=9094, sasl_users={"ops": "pw-1"}, tls=tls)
    keystore = tmp_path / "keystore.pem"
    props = _properties(server_properties(config, tmp_path / "logs", keystore))
    assert props["listeners"].split(",") == [
        "PLAINTEXT://127.0.0.1:9092",
        "CONTROLLER://127.0.0.1:9093",
        "SASL_SSL://127.0.0.1:9094",
    ]
    assert "SASL_SSL://127.0.0.1:9094" in props["advertised.listeners"]
    assert "SASL_SSL:SASL_SSL" in props["listener.security.protocol.map"]
    assert props["inter.broker.listener.name"] == "PLAINTEXT"
    assert props["controller.listener.names"] == "CONTROLLER"
    assert props["listener.name.sasl_ssl.sasl.enabled.mechanisms"] == "SCRAM-SHA-512"
    assert props["listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config"] == (
        "org.apache.kafka.common.security.scram.ScramLoginModule required;"
    )
    assert props["listener.name.sasl_ssl.ssl.keystore.type"] == "PEM"
    assert props["listener.name.sasl_ssl.ssl.keystore.location"] == str(keystore)
    assert config.sasl_ssl_bootstrap == "127.0.0.1:9094"
    assert scram_arguments(config) == ["--add-scram=SCRAM-SHA-512=[name=ops,password=pw-1]"]


def test_a_sasl_listener_needs_tls_users_and_plain_passwords(tmp_path: Path, tls: TlsFiles) -> None:
    """A SASL_SSL port without certificates or users is refused, and so is a password the
    storage tool's grammar would cut short (comma, bracket)."""
    with pytest.raises(ValueError, match="tls files"):
        KafkaConfig(data_dir=tmp_path, sasl_ssl_port=9094, sasl_users={"ops": "pw"})
    with pytest.raises(ValueError, match="sasl user"):
        KafkaConfig(data_dir=tmp_path, sasl_ssl_port=9094, tls=tls)
    config = KafkaConfig(data_dir=tmp_path, sasl_ssl_port=9094, sasl_users={"ops": "a,b"}, tls=tls)
    with pytest.raises(ValueError, match="names and passwords of"):
        scram_arguments(config)


def test_the_keystore_holds_the_key_then_the_certificate(tls: TlsFiles) -> None:
    """Kafka's PEM keystore file: the PKCS#8 private key and the server certificate."""
    pem = keystore_pem(tls)
    assert pem.index("-----BEGIN PRIVATE KEY-----") < pem.index("-----BEGIN CERTIFICATE-----")
    assert pem.count("-----BEGIN CERTIFICATE-----") == 1


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_the_server_certificate_verifies_against_the_ca_for_loopback(
    tls: TlsFiles, host: str
) -> None:
    """A TLS client trusting only the generated CA completes a handshake with the server
    certificate, checking the host name against its SAN (IP and DNS)."""
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(tls.server_cert, tls.server_key)
    client_context = ssl.create_default_context(cafile=tls.ca_cert)
    left, right = socket.socketpair()
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            with server_context.wrap_socket(right, server_side=True):
                pass
        except (OSError, ssl.SSLError) as exc:  # reported by the assertion below
            errors.append(exc)

    server = threading.Thread(target=serve)
    server.start()
    with client_context.wrap_socket(left, server_hostname=host) as client:
        assert client.version() in ("TLSv1.2", "TLSv1.3")
    server.join(timeout=10)
    assert errors == []


def test_a_client_without_the_ca_refuses_the_certificate(tls: TlsFiles) -> None:
    """The system store does not hold the throwaway CA: verification fails."""
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(tls.server_cert, tls.server_key)
    left, right = socket.socketpair()

    def serve() -> None:
        try:
            with server_context.wrap_socket(right, server_side=True):
                pass
        except (OSError, ssl.SSLError):
            pass  # the client hangs up mid-handshake: expected here, asserted on the client side

    server = threading.Thread(target=serve)
    server.start()
    with pytest.raises(ssl.SSLCertVerificationError):
        ssl.create_default_context().wrap_socket(left, server_hostname="127.0.0.1")
    left.close()
    server.join(timeout=10)
