"""The router's in-memory state: the registry's deployments, readiness, and routing tables.

Rebuilt on every start from the compacted registry topic (``apply`` each record in log order)
and heartbeats; nothing else is stored. No I/O here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from medmesh_contracts.lifecycle import ModelDeployment
from medmesh_contracts.modelspec import ModelSpec
from medmesh_router.readiness import Readiness
from medmesh_router.routing import RoutingTable, build_table


@dataclass(frozen=True)
class ReadinessChange:
    """A version that started or stopped being able to serve."""

    model: str
    version: int
    servable: bool


class RouterState:
    """Deployments by model, readiness, and the routing tables that follow from both."""

    def __init__(self, specs: Mapping[str, ModelSpec], readiness: Readiness) -> None:
        # Held, not copied: the router's SpecCatalog updates it in place on a hot deploy.
        self.specs = specs
        self.readiness = readiness
        self.deployments: dict[str, ModelDeployment] = {}
        self.tables: dict[str, RoutingTable] = {}
        self._servable: dict[tuple[str, int], bool] = {}

    def _deployable(self, model: str, version: int) -> bool:
        spec = self.specs.get(model)
        return spec is not None and any(v.version == version for v in spec.versions)

    def servable(self, model: str, version: int, now: datetime) -> bool:
        """A version can get traffic: its spec deploys it and its workers are (or may be) up."""
        return self._deployable(model, version) and self.readiness.servable(model, version, now)

    def apply(self, deployment: ModelDeployment, now: datetime) -> bool:
        """Adopt a registry record unless it is older than the one held; True when adopted."""
        if deployment.model not in self.specs:
            return False
        current = self.deployments.get(deployment.model)
        if current is not None and deployment.revision < current.revision:
            return False
        self.deployments[deployment.model] = deployment
        self._rebuild(deployment.model, now)
        return True

    def mirrored(self, model: str) -> bool:
        """The model's routing table sends shadow copies to some version."""
        table = self.tables.get(model)
        return table is not None and bool(table.shadows)

    def _rebuild(self, model: str, now: datetime) -> None:
        deployment = self.deployments[model]
        for v in deployment.versions:
            self._servable[(model, v.version)] = self.servable(model, v.version, now)
        self.tables[model] = build_table(
            deployment, lambda version: self._servable.get((model, version), False)
        )

    def refresh(self, now: datetime) -> list[ReadinessChange]:
        """Re-evaluate readiness; rebuild the tables that changed and say which versions did."""
        changes: list[ReadinessChange] = []
        for model, deployment in self.deployments.items():
            changed = False
            for v in deployment.versions:
                if v.state == "retired":
                    continue
                key = (model, v.version)
                now_servable = self.servable(model, v.version, now)
                if self._servable.get(key) != now_servable:
                    changed = True
                    changes.append(ReadinessChange(model, v.version, now_servable))
            if changed:
                self._rebuild(model, now)
        return changes
