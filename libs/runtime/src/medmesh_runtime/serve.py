"""Serving a service's ASGI app: the one entrypoint every ``python -m medmesh_<service>`` uses.

Every server it starts has the same limits (docs/deployment.md, "HTTP and TLS"): deadlines for a
request's headers and body and a cap on open connections (``httpserver``), /metrics only where
``metricsgate`` allows it, and TLS when a certificate is configured.
"""

from __future__ import annotations

import copy
import socket
import sys
from typing import Any

import uvicorn
from uvicorn.config import STARTUP_FAILURE

from medmesh_runtime.httpserver import deadline_protocol
from medmesh_runtime.metricsgate import MetricsExposure, MetricsGate
from medmesh_runtime.settings import ServiceSettings


def server_config(app: Any, settings: ServiceSettings, port: int) -> uvicorn.Config:
    """The uvicorn configuration of a service's server on ``port``, its app behind the metrics
    gate. Raises ValueError when /metrics would be open to anyone (``MetricsExposure.of``).

    lifespan="on": a failing startup hook (Kafka or Triton unreachable) ends the process with an
    error instead of leaving a server up that consumes nothing. Logging stays with medmesh's JSON
    configuration.
    """
    exposure = MetricsExposure.of(settings, port)
    limit = settings.http_max_connections
    return uvicorn.Config(
        MetricsGate(app, exposure),
        host=settings.http_host,
        port=port,
        log_config=None,
        access_log=False,
        lifespan="on",
        http=deadline_protocol(
            header_timeout_s=settings.http_header_timeout_s,
            body_timeout_s=settings.http_body_timeout_s,
            max_connections=limit,
        ),
        # No service speaks WebSocket: an Upgrade header is ignored instead of handed to a
        # protocol without these deadlines.
        ws="none",
        # The protocol refuses a connection beyond `limit` at once; uvicorn's own limit then
        # only bounds requests in flight. It answers 503 when the open connections, the asking
        # one included, reach its value: one more lets `limit` connections all be served.
        limit_concurrency=limit + 1,
        # The kernel queues no more not-yet-accepted connections than may be open at once.
        backlog=limit,
        ssl_certfile=settings.tls_cert_file,
        ssl_keyfile=settings.tls_key_file,
    )


def listen_sockets(config: uvicorn.Config, metrics_port: int | None) -> list[socket.socket]:
    """The service's socket and, with a metrics port, one more on it: one server serves both,
    so the metrics port has the same limits, lifespan and signal handling."""
    sockets = [config.bind_socket()]
    if metrics_port is not None:
        metrics = copy.copy(config)  # binding reads only host, port, uds, fd and TLS
        metrics.port = metrics_port
        try:
            sockets.append(metrics.bind_socket())
        except BaseException:
            sockets[0].close()
            raise
    return sockets


def serve(app: Any, settings: ServiceSettings, port: int) -> None:
    """Run the app on MEDMESH_HTTP_HOST:``port`` (and MEDMESH_METRICS_PORT) until a signal.

    Exits with a message when the settings would leave /metrics open to anyone, and with
    uvicorn's startup-failure status when the app's startup failed.
    """
    try:
        config = server_config(app, settings, port)
    except ValueError as refused:
        raise SystemExit(f"medmesh: {refused}") from None
    server = uvicorn.Server(config)
    sockets = listen_sockets(config, settings.metrics_port)
    try:
        server.run(sockets=sockets)
    except KeyboardInterrupt:
        pass  # a second Ctrl+C during shutdown: uvicorn.run ends the same way
    finally:
        for sock in sockets:
            sock.close()
    if not server.started:
        sys.exit(STARTUP_FAILURE)
