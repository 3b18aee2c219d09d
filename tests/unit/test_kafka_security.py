"""Kafka security settings reach every client a service builds, faststream's or its own."""

from __future__ import annotations

import ssl

from medmesh_runtime.kafka import aiokafka_security
from medmesh_runtime.settings import ServiceSettings


def test_plaintext_adds_no_client_options() -> None:
    """With PLAINTEXT (local stack) plain aiokafka clients get no security arguments."""
    assert aiokafka_security(ServiceSettings()) == {}


def test_sasl_ssl_scram_becomes_aiokafka_arguments() -> None:
    """SASL_SSL with SCRAM gives the protocol, mechanism, credentials and a TLS context."""
    options = aiokafka_security(
        ServiceSettings(
            kafka_security_protocol="SASL_SSL",
            kafka_sasl_mechanism="SCRAM-SHA-256",
            kafka_sasl_username="medmesh",
            kafka_sasl_password="secret",  # noqa: S106 -- a test credential, not a secret
        )
    )
    assert options["security_protocol"] == "SASL_SSL"
    assert options["sasl_mechanism"] == "SCRAM-SHA-256"
    assert (options["sasl_plain_username"], options["sasl_plain_password"]) == ("medmesh", "secret")
    assert isinstance(options["ssl_context"], ssl.SSLContext)
