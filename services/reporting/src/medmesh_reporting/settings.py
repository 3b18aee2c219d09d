"""Configuration of the reporting service (environment variables prefixed MEDMESH_)."""

from __future__ import annotations

from medmesh_runtime.settings import ServiceSettings


class ReportingSettings(ServiceSettings):
    """Reporting: consumes inference results, publishes FHIR report Bundles."""

    reporting_port: int = 8184
    reporting_group_id: str = "medmesh-reporting"
    # The organization that operates medmesh, shown as the report's performer (display only).
    performer_display: str | None = None
