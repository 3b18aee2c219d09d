"""Run the inference service: python -m medmesh_inference."""

from __future__ import annotations

from medmesh_inference.app import create_app
from medmesh_inference.settings import WorkerSettings
from medmesh_runtime.serve import serve


def main() -> None:
    """Serve on MEDMESH_HTTP_HOST and MEDMESH_WORKER_PORT (health endpoints; FHIR for ingest);
    /metrics where MEDMESH_METRICS_PORT and MEDMESH_METRICS_TOKEN say."""
    settings = WorkerSettings()
    serve(create_app(settings), settings, settings.worker_port)


if __name__ == "__main__":
    main()
