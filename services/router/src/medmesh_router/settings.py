"""Configuration of the router service (environment variables prefixed MEDMESH_)."""

from __future__ import annotations

from medmesh_runtime.settings import ServiceSettings


class RouterSettings(ServiceSettings):
    """Router: routes requests by the registry, watches readiness, runs the rollout controller."""

    router_port: int = 8181
    router_group_id: str = "medmesh-router"
    # Requests routed per poll at most (one transaction per requests partition and poll).
    router_max_batch: int = 500
    # How often readiness is re-evaluated and the rollout controller judges (seconds).
    router_tick_s: float = 1.0
    # Run the progressive-delivery controller here (enable it on one router replica only).
    router_controller: bool = True
    # Off: a version never seen in a heartbeat is routed as the registry says (workers that do
    # not publish heartbeats keep working). On: only versions seen live get traffic.
    router_require_heartbeats: bool = False
    # Longest wait for the registry to be read at start before the router gives up.
    router_registry_timeout_s: float = 30.0
