"""Run the console: python -m medmesh_console."""

from __future__ import annotations

from medmesh_console.app import create_app
from medmesh_console.settings import ConsoleSettings
from medmesh_runtime.serve import serve


def main() -> None:
    """Serve on MEDMESH_HTTP_HOST and MEDMESH_CONSOLE_PORT (pages, /healthz, /readyz);
    /metrics where MEDMESH_METRICS_PORT and MEDMESH_METRICS_TOKEN say."""
    settings = ConsoleSettings()
    try:
        app = create_app(settings)
    except ValueError as refused:  # a public address without tokens
        raise SystemExit(f"medmesh console: {refused}") from None
    serve(app, settings, settings.console_port)


if __name__ == "__main__":
    main()
