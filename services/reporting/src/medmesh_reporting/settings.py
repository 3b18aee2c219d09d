"""Configuration of the reporting service (environment variables prefixed MEDMESH_)."""

from __future__ import annotations

from pydantic import SecretStr

from medmesh_runtime.settings import ServiceSettings
from medmesh_runtime.smart import SmartClientSettings


class ReportingSettings(ServiceSettings):
    """Reporting: consumes inference results, publishes FHIR report Bundles in transactions."""

    reporting_port: int = 8184
    reporting_group_id: str = "medmesh-reporting"
    # The organization that operates medmesh, shown as the report's performer (display only).
    performer_display: str | None = None
    # Results per transaction at most, and how long one poll waits for the first of them.
    reporting_batch_max: int = 200
    reporting_poll_timeout_ms: int = 200
    # A crashed instance's partitions move after this long without heartbeats; 6 s is the broker's
    # default minimum (group.min.session.timeout.ms), so a restarted instance takes over quickly.
    reporting_session_timeout_ms: int = 6000
    reporting_heartbeat_interval_ms: int = 2000
    # An open transaction of a crashed instance whose partitions no instance took over is
    # aborted after this long (a takeover fences and aborts it at once).
    reporting_transaction_timeout_ms: int = 60000

    # Optional delivery of every report to the hospital's FHIR server (off when no URL is set).
    fhir_server_url: str | None = None
    fhir_server_token: SecretStr | None = None
    # Or SMART Backend Services (JSON: token_url, client_id, private_key_file, scope, ...).
    fhir_server_smart: SmartClientSettings | None = None
    delivery_group_id: str = "medmesh-reporting-delivery"
    delivery_timeout_s: float = 10.0
    # A report the server keeps failing on (5xx, 429, no connection) is given up after this long.
    delivery_give_up_s: float = 600.0
