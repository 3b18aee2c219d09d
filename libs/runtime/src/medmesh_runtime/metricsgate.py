"""Where and to whom a service serves /metrics.

The figures name topics, models, versions and traffic, never patients, but they map the system
for whoever reads them, and ingest's port faces hospital networks. So /metrics is served either
on a port of its own (MEDMESH_METRICS_PORT, which a NetworkPolicy or firewall opens to Prometheus
only: what compose and Kubernetes use, since Prometheus' pod annotations cannot carry a token) or
behind a bearer token (MEDMESH_METRICS_TOKEN, which Prometheus sends with ``authorization`` in its
scrape config), or both; on the service's own port without a token only while that port listens
on loopback (``medmesh up``, tests).
"""

from __future__ import annotations

import hmac
import ipaddress
from dataclasses import dataclass
from typing import Any

from medmesh_runtime.metrics import PROMETHEUS_CONTENT_TYPE, prometheus_text
from medmesh_runtime.settings import ServiceSettings

METRICS_PATH = "/metrics"

Scope = dict[str, Any]
Receive = Any
Send = Any


def is_loopback(host: str) -> bool:
    """Whether a listen address only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class MetricsExposure:
    """The port /metrics is served on (None: the service's own) and the token it asks for."""

    port: int | None
    token: str | None

    @classmethod
    def of(cls, settings: ServiceSettings, service_port: int) -> MetricsExposure:
        """The exposure these settings ask for; ValueError when it would be open to anyone."""
        token = settings.metrics_token.get_secret_value() if settings.metrics_token else None
        port = settings.metrics_port
        if port is not None and port == service_port:
            raise ValueError(f"MEDMESH_METRICS_PORT is the service's own port ({port})")
        if port is None and not token and not is_loopback(settings.http_host):
            raise ValueError(
                f"will not serve /metrics to anyone on {settings.http_host}:{service_port}: set "
                "MEDMESH_METRICS_PORT (a port only Prometheus may reach) or MEDMESH_METRICS_TOKEN, "
                "or listen on 127.0.0.1"
            )
        return cls(port, token or None)


class MetricsGate:
    """ASGI app in front of a service's app: it alone answers /metrics, and the metrics port."""

    def __init__(self, app: Any, exposure: MetricsExposure) -> None:
        self.app = app
        self.exposure = exposure

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)  # lifespan: the app's own
            return
        server = scope.get("server")  # (host, port) of the socket the request came in on
        on_metrics_port = server is not None and server[1] == self.exposure.port
        if on_metrics_port or (self.exposure.port is None and scope["path"] == METRICS_PATH):
            await self._metrics(scope, send)
        elif scope["path"] == METRICS_PATH:
            await _plain(send, 404, b"not found")  # only on the metrics port
        else:
            await self.app(scope, receive, send)

    async def _metrics(self, scope: Scope, send: Send) -> None:
        if scope["path"] != METRICS_PATH:
            await _plain(send, 404, b"not found")
        elif scope["method"] not in ("GET", "HEAD"):
            await _plain(send, 405, b"method not allowed", [(b"allow", b"GET, HEAD")])
        elif not self._authorized(scope):
            challenge = [(b"www-authenticate", b'Bearer realm="medmesh-metrics"')]
            await _plain(send, 401, b"a valid bearer token is required", challenge)
        else:
            content_type = PROMETHEUS_CONTENT_TYPE.encode()
            await _plain(send, 200, prometheus_text(), [], content_type)

    def _authorized(self, scope: Scope) -> bool:
        if self.exposure.token is None:
            return True
        values = [v for k, v in scope["headers"] if k == b"authorization"]
        scheme, _, given = (values[0] if values else b"").decode("latin-1").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            given.strip().encode(), self.exposure.token.encode()
        )


async def _plain(
    send: Send,
    status: int,
    body: bytes,
    headers: list[tuple[bytes, bytes]] | None = None,
    content_type: bytes = b"text/plain; charset=utf-8",
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", content_type),
                (b"content-length", str(len(body)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
