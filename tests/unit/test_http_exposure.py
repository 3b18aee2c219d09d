"""Where /metrics may be served, and which HTTP settings a service refuses."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import SecretStr, ValidationError

from medmesh_runtime.metricsgate import MetricsExposure, is_loopback
from medmesh_runtime.serve import serve
from medmesh_runtime.settings import ServiceSettings

PUBLIC = "0.0.0.0"  # noqa: S104 -- the address being classified


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.0.0.2", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        (PUBLIC, False),
        ("10.1.2.3", False),
        ("::", False),
        ("ingest", False),
    ],
)
def test_loopback_addresses_are_recognised(host: str, loopback: bool) -> None:
    """Only addresses reachable from this machine alone count as loopback."""
    assert is_loopback(host) is loopback


def test_metrics_on_a_loopback_service_port_need_no_token() -> None:
    """On loopback, /metrics is served on the service's port without a token."""
    assert MetricsExposure.of(ServiceSettings(), 8181) == MetricsExposure(None, None)


def test_metrics_beyond_loopback_need_a_port_or_a_token() -> None:
    """Beyond loopback without a metrics port or token, the exposure is refused."""
    with pytest.raises(ValueError, match="MEDMESH_METRICS_PORT"):
        MetricsExposure.of(ServiceSettings(http_host=PUBLIC), 8181)
    with_port = ServiceSettings(http_host=PUBLIC, metrics_port=9100)
    assert MetricsExposure.of(with_port, 8181) == MetricsExposure(9100, None)
    with_token = ServiceSettings(http_host=PUBLIC, metrics_token=SecretStr("t"))
    assert MetricsExposure.of(with_token, 8181) == MetricsExposure(None, "t")


def test_the_metrics_port_must_differ_from_the_service_port() -> None:
    """A metrics port equal to the service's port is refused (it would share the public port)."""
    with pytest.raises(ValueError, match="own port"):
        MetricsExposure.of(ServiceSettings(metrics_port=8181), 8181)


def test_serve_exits_with_a_message_instead_of_exposing_metrics() -> None:
    """serve() ends the process with a message, binding nothing, when metrics would be open."""
    with pytest.raises(SystemExit, match="MEDMESH_METRICS_TOKEN"):
        serve(object(), ServiceSettings(http_host=PUBLIC), 8181)


def test_a_tls_key_without_a_certificate_is_refused() -> None:
    """MEDMESH_TLS_KEY_FILE alone is a configuration error, not silently plain HTTP."""
    with pytest.raises(ValidationError, match="MEDMESH_TLS_CERT_FILE"):
        ServiceSettings(tls_key_file=Path("key.pem"))


def test_the_http_defaults_are_hardened() -> None:
    """By default: header and body deadlines, a connection cap, no API docs, no TLS in-process."""
    settings = ServiceSettings()
    assert (settings.http_header_timeout_s, settings.http_body_timeout_s) == (10.0, 60.0)
    assert settings.http_max_connections == 512
    assert settings.http_docs is False
    assert settings.tls_cert_file is None
