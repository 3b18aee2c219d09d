"""Serving a service's ASGI app: the one entrypoint every ``python -m medmesh_<service>`` uses."""

from __future__ import annotations

from typing import Any

import uvicorn


def serve(app: Any, host: str, port: int) -> None:
    """Run the app with uvicorn; logging stays with medmesh's JSON configuration."""
    uvicorn.run(app, host=host, port=port, log_config=None, access_log=False)
