"""The local broker's optional SSL listener with required client certificates (mutual TLS), and
the throwaway CA's client certificate (devstack.kafka, devstack.tls)."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from medmesh_cli.devstack.kafka import KafkaConfig, server_properties
from medmesh_cli.devstack.tls import TlsFiles, generate_tls


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    """A CA, a loopback server certificate and a client certificate for CN=ops."""
    return generate_tls(tmp_path_factory.mktemp("tls"), client="ops")


def _properties(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if line)


def test_an_ssl_listener_requires_client_certificates_of_the_ca(
    tmp_path: Path, tls: TlsFiles
) -> None:
    """An SSL port adds a listener that requires a client certificate chaining to the CA (PEM
    truststore), beside PLAINTEXT, which stays the broker's own listener."""
    config = KafkaConfig(data_dir=tmp_path, ssl_port=9095, tls=tls)
    keystore = tmp_path / "keystore.pem"
    props = _properties(server_properties(config, tmp_path / "logs", keystore))
    assert props["listeners"].split(",") == [
        "PLAINTEXT://127.0.0.1:9092",
        "CONTROLLER://127.0.0.1:9093",
        "SSL://127.0.0.1:9095",
    ]
    assert "SSL://127.0.0.1:9095" in props["advertised.listeners"].split(",")
    assert "SSL:SSL" in props["listener.security.protocol.map"].split(",")
    assert props["inter.broker.listener.name"] == "PLAINTEXT"
    assert props["listener.name.ssl.ssl.client.auth"] == "required"
    assert props["listener.name.ssl.ssl.keystore.type"] == "PEM"
    assert props["listener.name.ssl.ssl.keystore.location"] == str(keystore)
    assert props["listener.name.ssl.ssl.truststore.type"] == "PEM"
    assert props["listener.name.ssl.ssl.truststore.location"] == str(tls.ca_cert)
    assert config.ssl_bootstrap == "127.0.0.1:9095"
    assert not [key for key in props if "sasl" in key]


def test_both_tls_listeners_share_one_keystore(tmp_path: Path, tls: TlsFiles) -> None:
    """SASL_SSL (no client certificate asked for) and SSL (required) side by side."""
    config = KafkaConfig(
        data_dir=tmp_path, sasl_ssl_port=9094, ssl_port=9095, sasl_users={"ops": "pw"}, tls=tls
    )
    keystore = tmp_path / "keystore.pem"
    props = _properties(server_properties(config, tmp_path / "logs", keystore))
    assert props["listeners"].endswith("SASL_SSL://127.0.0.1:9094,SSL://127.0.0.1:9095")
    assert props["listener.name.sasl_ssl.ssl.client.auth"] == "none"
    assert props["listener.name.ssl.ssl.client.auth"] == "required"
    assert props["listener.name.sasl_ssl.ssl.keystore.location"] == str(keystore)
    assert props["listener.name.ssl.ssl.keystore.location"] == str(keystore)


def test_an_ssl_listener_needs_tls_files(tmp_path: Path) -> None:
    """An SSL port without certificates is refused when the config is made."""
    with pytest.raises(ValueError, match="SSL listener needs tls files"):
        KafkaConfig(data_dir=tmp_path, ssl_port=9095)
    with pytest.raises(RuntimeError, match="no SSL listener"):
        _ = KafkaConfig(data_dir=tmp_path).ssl_bootstrap


def test_the_client_certificate_is_for_client_auth_signed_by_the_ca(tls: TlsFiles) -> None:
    """The client certificate names CN=ops, is for client authentication only, and is signed by
    the generated CA; without ``client`` none is written."""
    assert tls.client_cert is not None
    assert tls.client_key is not None
    ca = x509.load_pem_x509_certificate(tls.ca_cert.read_bytes())
    client = x509.load_pem_x509_certificate(tls.client_cert.read_bytes())
    assert client.subject.rfc4514_string() == "CN=ops,O=medmesh devstack"
    assert client.issuer == ca.subject
    client.verify_directly_issued_by(ca)
    usage = client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert tls.client_key.stat().st_mode & 0o077 == 0
    assert b"PRIVATE KEY" in tls.client_key.read_bytes()


def test_without_a_client_name_no_client_certificate_is_made(tmp_path: Path) -> None:
    """generate_tls without ``client`` writes the CA and the server's files only."""
    files = generate_tls(tmp_path)
    assert files.client_cert is None
    assert files.client_key is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ca.crt", "server.crt", "server.key"]
