"""Serving a service's ASGI app: the one entrypoint every ``python -m medmesh_<service>`` uses."""

from __future__ import annotations

from typing import Any

import uvicorn


def serve(app: Any, host: str, port: int) -> None:
    """Run the app with uvicorn; logging stays with medmesh's JSON configuration.

    lifespan="on": a failing startup hook (Kafka or Triton unreachable) ends the process with an
    error instead of leaving a server up that consumes nothing.
    """
    uvicorn.run(app, host=host, port=port, log_config=None, access_log=False, lifespan="on")
