"""Run the ingest service: python -m medmesh_ingest."""

from __future__ import annotations

from medmesh_ingest.app import create_app
from medmesh_ingest.settings import IngestSettings, check_pseudonym_key
from medmesh_runtime.serve import serve


def main() -> None:
    """Serve on MEDMESH_HTTP_HOST and MEDMESH_INGEST_PORT (health endpoints; FHIR for ingest);
    /metrics where MEDMESH_METRICS_PORT and MEDMESH_METRICS_TOKEN say."""
    settings = IngestSettings()
    try:
        # Here, not in create_app: tests and tools embed the app with the development key.
        check_pseudonym_key(settings)
        app = create_app(settings)
    except ValueError as refused:  # e.g. a public address without bearer tokens
        raise SystemExit(f"medmesh ingest: {refused}") from None
    serve(app, settings, settings.ingest_port)


if __name__ == "__main__":
    main()
