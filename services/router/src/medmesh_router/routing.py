"""Routing decisions: pure functions from a request and a routing table to model versions.

A patient's pseudonym hashes into one of 10,000 buckets. The stable version owns the lowest
bucket range and each canary a range above it, in version order, so while the weights stay the
same a patient always lands on the same version (sticky), and a canary that grows from 5 % to
10 % keeps every bucket it had (monotonic): its range only extends downwards into stable's.
Rules (site, ward, source system) pin a version before buckets are looked at. A shadow version
receives a mirrored copy of the requests whose bucket lies below its shadow share.

A ``RoutingTable`` is built from the registry's ``ModelDeployment`` and the versions that can
serve now (live, ready workers): a canary that cannot serve gives its share back to stable.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime

from medmesh_contracts.events import Producer, RequestInference, RouteDecision, RunInference
from medmesh_contracts.lifecycle import PERCENT, ModelDeployment, RoutingRule
from medmesh_contracts.topics import model_task_topic

BUCKETS = 10_000
BUCKETS_PER_PERCENT = BUCKETS // PERCENT


def bucket_of(model: str, patient_pseudonym: str) -> int:
    """The patient's bucket (0..9999) for one model; stable across processes and restarts."""
    digest = hashlib.sha256(f"{model}\x00{patient_pseudonym}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % BUCKETS


@dataclass(frozen=True)
class RoutingTable:
    """How one model's requests are routed right now (built from the registry and readiness)."""

    model: str
    revision: int
    # (upper bucket, exclusive; version), stable's range first.
    ranges: tuple[tuple[int, int], ...]
    rules: tuple[RoutingRule, ...] = ()
    # (version, number of buckets mirrored): buckets below the number get a shadow copy.
    shadows: tuple[tuple[int, int], ...] = ()

    def version_for_bucket(self, bucket: int) -> int:
        """The version whose bucket range contains ``bucket``."""
        for upper, version in self.ranges:
            if bucket < upper:
                return version
        raise ValueError(f"routing table of {self.model} does not cover bucket {bucket}")

    @property
    def weights(self) -> dict[int, int]:
        """Effective percentages per version (after readiness moved shares to stable)."""
        shares: dict[int, int] = {}
        lower = 0
        for upper, version in self.ranges:
            shares[version] = (upper - lower) // BUCKETS_PER_PERCENT
            lower = upper
        return {v: w for v, w in shares.items() if w}


def build_table(deployment: ModelDeployment, servable: Callable[[int], bool]) -> RoutingTable:
    """The routing table of a deployment given which versions can serve now.

    A canary that cannot serve gives its weight to stable; stable keeps its range whether or
    not it can serve (its tasks wait in Kafka: there is nowhere better to send them). Rules and
    shadows naming a version that cannot serve are left out.
    """
    stable = deployment.stable
    canaries = [v for v in deployment.versions if v.state == "canary" and v.weight > 0]
    moved = sum(v.weight for v in canaries if not servable(v.version))
    order = [(stable.version, stable.weight + moved)]
    order += [(v.version, v.weight) for v in canaries if servable(v.version)]
    ranges: list[tuple[int, int]] = []
    upper = 0
    for version, weight in order:
        if weight:
            upper += weight * BUCKETS_PER_PERCENT
            ranges.append((upper, version))
    live = {v.version for v in deployment.versions if v.state != "retired"}
    rules = tuple(r for r in deployment.rules if r.version in live and servable(r.version))
    shadows = tuple(
        (v.version, v.shadow_percent * BUCKETS_PER_PERCENT)
        for v in deployment.versions
        if v.state == "shadow" and v.shadow_percent > 0 and servable(v.version)
    )
    return RoutingTable(deployment.model, deployment.revision, tuple(ranges), rules, shadows)


class UnknownModelError(Exception):
    """The request names a model that is not deployed."""


@dataclass(frozen=True)
class Routed:
    """A task for one model version and the topic it goes to."""

    task: RunInference
    topic: str


@dataclass(frozen=True)
class RoutedRequest:
    """The task a request becomes, and the mirrored copies for shadow versions."""

    primary: Routed
    shadows: tuple[Routed, ...] = ()


def _task(
    request: RequestInference,
    version: int,
    decision: RouteDecision,
    producer: Producer,
    now: datetime,
) -> Routed:
    task = RunInference(
        correlation_id=request.correlation_id,
        producer=producer,
        model_version=version,
        route=decision,
        routed_at=now,
        request=request,
    )
    return Routed(task=task, topic=model_task_topic(request.model, version))


def route(
    request: RequestInference,
    tables: Mapping[str, RoutingTable],
    producer: Producer,
    now: datetime,
) -> RoutedRequest:
    """Choose the version for a request (rules first, then buckets) and its shadow copies."""
    table = tables.get(request.model)
    if table is None:
        raise UnknownModelError(
            f"model {request.model!r} is not deployed (known: {sorted(tables)})"
        )
    bucket = bucket_of(table.model, request.patient_pseudonym)
    decision: RouteDecision | None = None
    version = 0
    for index, rule in enumerate(table.rules):
        if rule.matches(request.source):
            version = rule.version
            decision = RouteDecision(
                reason="rule", detail=f"rule {index} (revision {table.revision})"
            )
            break
    if decision is None:
        version = table.version_for_bucket(bucket)
        decision = RouteDecision(
            reason="bucket", detail=f"bucket {bucket} (revision {table.revision})"
        )
    primary = _task(request, version, decision, producer, now)
    shadows = tuple(
        _task(
            request,
            shadow_version,
            RouteDecision(reason="shadow", detail=f"bucket {bucket} mirrors v{version}"),
            producer,
            now,
        )
        for shadow_version, limit in table.shadows
        if bucket < limit and shadow_version != version
    )
    return RoutedRequest(primary, shadows)
