"""A throwaway certificate authority, a loopback server certificate and optionally a client
certificate, for the local broker's TLS listeners (the end-to-end tests of the CLI against
SASL_SSL and mutual TLS).

Nothing here is for a real deployment: the CA's key is never written, lives only while
``generate_tls`` runs, and signs only a certificate for 127.0.0.1 and localhost and the one
client certificate asked for.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass, replace
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of a generated CA and the server certificate it signed."""

    ca_cert: Path
    server_cert: Path
    server_key: Path
    # A client certificate and its key (mutual TLS), when one was asked for.
    client_cert: Path | None = None
    client_key: Path | None = None


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "medmesh devstack"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    # PKCS#8 unencrypted: Kafka's PEM keystore reads PKCS#8 (encrypted only with a password set).
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _leaf(
    subject: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    ca_name: x509.Name,
    ca_key: ec.EllipticCurvePrivateKey,
    valid: tuple[dt.datetime, dt.datetime],
    usage: x509.ObjectIdentifier,
) -> x509.CertificateBuilder:
    """An end-entity certificate for ``usage`` (server or client authentication) by the CA."""
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid[0])
        .not_valid_after(valid[1])
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
    )


def generate_tls(
    folder: Path,
    hosts: tuple[str, ...] = ("127.0.0.1", "localhost"),
    client: str | None = None,
) -> TlsFiles:
    """Write ``ca.crt``, ``server.crt`` and ``server.key`` (PEM) into ``folder``: a fresh CA and a
    server certificate for ``hosts`` (IP addresses as IP SANs, names as DNS SANs), valid a day;
    with ``client``, also ``client.crt`` and ``client.key``: a client certificate the same CA
    signed, subject ``CN=<client>,O=medmesh devstack`` (the broker's SSL principal)."""
    folder.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    # A little in the past: a client whose clock is a moment behind must not see "not yet valid".
    not_before, not_after = now - dt.timedelta(minutes=5), now + dt.timedelta(days=1)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("medmesh devstack CA")
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )

    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    server_key = ec.generate_private_key(ec.SECP256R1())
    valid = (not_before, not_after)
    server_cert = (
        _leaf(_name(hosts[0]), server_key, ca_name, ca_key, valid, ExtendedKeyUsageOID.SERVER_AUTH)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    files = TlsFiles(folder / "ca.crt", folder / "server.crt", folder / "server.key")
    files.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files.server_cert.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    files.server_key.write_bytes(_pem_key(server_key))
    files.server_key.chmod(0o600)
    if client is None:
        return files

    client_key = ec.generate_private_key(ec.SECP256R1())
    client_cert = _leaf(
        _name(client), client_key, ca_name, ca_key, valid, ExtendedKeyUsageOID.CLIENT_AUTH
    ).sign(ca_key, hashes.SHA256())
    cert_path, key_path = folder / "client.crt", folder / "client.key"
    cert_path.write_bytes(client_cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(_pem_key(client_key))
    key_path.chmod(0o600)
    return replace(files, client_cert=cert_path, client_key=key_path)
