"""Run the monolith topology: python -m medmesh_monolith."""

from __future__ import annotations

from medmesh_ingest.settings import check_pseudonym_key
from medmesh_monolith.app import create_app
from medmesh_monolith.settings import MonolithSettings
from medmesh_runtime.serve import serve


def main() -> None:
    """Serve ingest's endpoints on MEDMESH_HTTP_HOST and MEDMESH_INGEST_PORT, all stages inside."""
    settings = MonolithSettings()
    try:
        check_pseudonym_key(settings)  # as python -m medmesh_ingest does
        app = create_app(settings)
    except ValueError as refused:  # e.g. a public address without bearer tokens
        raise SystemExit(f"medmesh monolith: {refused}") from None
    serve(app, settings, settings.ingest_port)


if __name__ == "__main__":
    main()
