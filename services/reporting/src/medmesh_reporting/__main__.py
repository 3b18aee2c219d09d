"""Run the reporting service: python -m medmesh_reporting."""

from __future__ import annotations

from medmesh_reporting.app import create_app
from medmesh_reporting.settings import ReportingSettings
from medmesh_runtime.serve import serve


def main() -> None:
    """Serve on MEDMESH_HTTP_HOST and MEDMESH_REPORTING_PORT (health endpoints; FHIR for ingest);
    /metrics where MEDMESH_METRICS_PORT and MEDMESH_METRICS_TOKEN say."""
    settings = ReportingSettings()
    serve(create_app(settings), settings, settings.reporting_port)


if __name__ == "__main__":
    main()
