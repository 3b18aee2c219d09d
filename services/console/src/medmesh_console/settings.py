"""Configuration of the console (environment variables prefixed MEDMESH_)."""

from __future__ import annotations

from pydantic import Field, SecretStr

from medmesh_runtime.metricsgate import is_loopback
from medmesh_runtime.settings import ServiceSettings


class ConsoleSettings(ServiceSettings):
    """Console: reads the router's /models and Kafka topics, serves read-only HTML pages."""

    console_port: int = 8190
    # Tokens that open the console, comma-separated (a bearer header, or ?token= once, which
    # sets a cookie). Without any the console only listens on loopback.
    console_tokens: SecretStr = SecretStr("")
    # The router's health port, whose GET /models has every model's registry record and figures.
    router_url: str = "http://127.0.0.1:8181"
    # The newest reports shown on the reports page (each read takes at most this many per
    # partition from the end of medmesh.reports.diagnostic).
    console_reports_limit: int = Field(default=50, ge=1, le=1000)
    # Seconds one page may wait for Kafka or the router before it says what it could not read.
    console_read_timeout_s: float = Field(default=10.0, gt=0)

    def tokens(self) -> tuple[str, ...]:
        """Every accepted token."""
        return tuple(
            t.strip() for t in self.console_tokens.get_secret_value().split(",") if t.strip()
        )


def check_listen_address(settings: ConsoleSettings) -> None:
    """Refuse to serve on a non-loopback address without tokens (ValueError), as ingest does."""
    if not settings.tokens() and not is_loopback(settings.http_host):
        raise ValueError(
            f"the console will not listen on {settings.http_host} without authentication: set "
            "MEDMESH_CONSOLE_TOKENS, or listen on 127.0.0.1"
        )
