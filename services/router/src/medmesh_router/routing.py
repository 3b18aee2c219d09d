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

from pydantic_core import from_json

from medmesh_contracts import headers as h
from medmesh_contracts.events import (
    Producer,
    RequestInference,
    RouteDecision,
    RunInference,
    run_inference_wire,
    schema_of,
)
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
class RouteKey:
    """What routing looks at: the model, the patient's pseudonym and where the request came from.

    Read from the record's key and headers (``RouteKey.from_headers``), so the router never
    parses a request's value; ``from_request`` gives the same for a parsed request.
    """

    model: str
    patient_pseudonym: str
    correlation_id: str
    site: str | None = None
    ward: str | None = None
    source_system: str | None = None

    @classmethod
    def from_request(cls, request: RequestInference) -> RouteKey:
        """The routing attributes of a parsed request."""
        return cls(
            request.model,
            request.patient_pseudonym,
            request.correlation_id,
            request.source.site,
            request.source.ward,
            request.source.source_system,
        )

    @classmethod
    def from_headers(cls, key: bytes | None, headers: Mapping[str, str]) -> RouteKey | None:
        """The routing attributes ingest wrote beside a request; None when any is missing."""
        model = headers.get(h.MODEL)
        correlation_id = headers.get(h.CORRELATION_ID)
        if (
            not key
            or not model
            or not correlation_id
            or headers.get(h.SCHEMA) != schema_of(RequestInference)
        ):
            return None
        return cls(
            model,
            key.decode(errors="replace"),
            correlation_id,
            headers.get(h.SITE),
            headers.get(h.WARD),
            headers.get(h.SOURCE_SYSTEM),
        )


class NotARequestError(Exception):
    """A record on the requests topic whose value cannot be a RequestInference."""


def route_key(key: bytes | None, headers: Mapping[str, str], value: bytes | None) -> RouteKey:
    """A record's routing attributes: from its key and headers, or (for a producer that does not
    write the routing headers) from its value parsed once. Raises pydantic's ValidationError or
    NotARequestError for a value that cannot be a request."""
    found = RouteKey.from_headers(key, headers)
    if found is None:
        return RouteKey.from_request(RequestInference.model_validate_json(value or b""))
    # The value is embedded verbatim in each task, so it must be one JSON object that agrees
    # with the headers; pydantic_core's JSON parser checks that in a few microseconds, where
    # validating the request as a model cost most of the router's time per message.
    try:
        document = from_json(value or b"")
    except ValueError as exc:
        raise NotARequestError(f"the value is not JSON: {exc}") from None
    if not isinstance(document, dict):
        raise NotARequestError("the value is not a JSON object")
    for field, expected in (
        ("model", found.model),
        ("correlation_id", found.correlation_id),
        ("patient_pseudonym", found.patient_pseudonym),
    ):
        if document.get(field) != expected:
            raise NotARequestError(f"the value's {field} does not match the record's headers")
    return found


@dataclass(frozen=True)
class Choice:
    """The version a request goes to and why, and the shadow versions that get a copy."""

    model: str
    version: int
    decision: RouteDecision
    shadows: tuple[tuple[int, RouteDecision], ...] = ()

    def targets(self) -> tuple[tuple[int, RouteDecision], ...]:
        """(version, decision) of the primary task first, then of each shadow copy."""
        return ((self.version, self.decision), *self.shadows)


def choose(key: RouteKey, tables: Mapping[str, RoutingTable]) -> Choice:
    """Choose the version for a request (rules first, then buckets) and its shadow copies."""
    table = tables.get(key.model)
    if table is None:
        raise UnknownModelError(f"model {key.model!r} is not deployed (known: {sorted(tables)})")
    bucket = bucket_of(table.model, key.patient_pseudonym)
    for index, rule in enumerate(table.rules):
        if rule.matches(key):
            version = rule.version
            decision = RouteDecision(
                reason="rule", detail=f"rule {index} (revision {table.revision})"
            )
            break
    else:
        version = table.version_for_bucket(bucket)
        decision = RouteDecision(
            reason="bucket", detail=f"bucket {bucket} (revision {table.revision})"
        )
    shadows = tuple(
        (
            shadow_version,
            RouteDecision(reason="shadow", detail=f"bucket {bucket} mirrors v{version}"),
        )
        for shadow_version, limit in table.shadows
        if bucket < limit and shadow_version != version
    )
    return Choice(key.model, version, decision, shadows)


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


def route(
    request: RequestInference,
    tables: Mapping[str, RoutingTable],
    producer: Producer,
    now: datetime,
) -> RoutedRequest:
    """Route a parsed request: its RunInference tasks (the primary, then shadow copies)."""
    choice = choose(RouteKey.from_request(request), tables)
    tasks = [
        Routed(
            task=RunInference(
                correlation_id=request.correlation_id,
                producer=producer,
                model_version=version,
                route=decision,
                routed_at=now,
                request=request,
            ),
            topic=model_task_topic(request.model, version),
        )
        for version, decision in choice.targets()
    ]
    return RoutedRequest(tasks[0], tuple(tasks[1:]))


@dataclass(frozen=True)
class RoutedWire:
    """A task as wire bytes for one model version, and the topic it goes to."""

    topic: str
    value: bytes
    version: int
    decision: RouteDecision


def route_wire(
    key: RouteKey,
    request_wire: bytes,
    tables: Mapping[str, RoutingTable],
    producer: Producer,
    now: datetime,
) -> list[RoutedWire]:
    """Route a request known by its key and headers: its tasks around the request's bytes as
    they arrived (the primary first, then shadow copies); nothing is parsed."""
    choice = choose(key, tables)
    return [
        RoutedWire(
            topic=model_task_topic(key.model, version),
            value=run_inference_wire(
                request_wire, key.correlation_id, version, decision, producer, now
            ),
            version=version,
            decision=decision,
        )
        for version, decision in choice.targets()
    ]
