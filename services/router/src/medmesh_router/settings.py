"""Configuration of the router service (environment variables prefixed MEDMESH_)."""

from __future__ import annotations

from medmesh_runtime.settings import ServiceSettings


class RouterSettings(ServiceSettings):
    """Router: consumes inference requests, publishes one task per request to a version's topic."""

    router_port: int = 8181
    router_group_id: str = "medmesh-router"
