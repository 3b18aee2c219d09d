"""Run the router service: python -m medmesh_router."""

from __future__ import annotations

from medmesh_router.app import create_app
from medmesh_router.settings import RouterSettings
from medmesh_runtime.serve import serve


def main() -> None:
    """Serve on MEDMESH_HTTP_HOST and MEDMESH_ROUTER_PORT (health endpoints; FHIR for ingest);
    /metrics where MEDMESH_METRICS_PORT and MEDMESH_METRICS_TOKEN say."""
    settings = RouterSettings()
    serve(create_app(settings), settings, settings.router_port)


if __name__ == "__main__":
    main()
