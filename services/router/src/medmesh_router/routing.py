"""Routing decisions: pure functions from a request and the model specs to a model version.

Assignment is by bucket: a patient's pseudonym hashes into one of 10,000 buckets, and versions own
contiguous bucket ranges in the order of their version numbers. The same patient therefore always
lands on the same version while the weights stay the same (sticky per patient).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from medmesh_contracts.events import Producer, RequestInference, RouteDecision, RunInference
from medmesh_contracts.modelspec import ModelSpec
from medmesh_contracts.topics import model_task_topic

BUCKETS = 10_000


def bucket_of(model: str, patient_pseudonym: str) -> int:
    """The patient's bucket (0..9999) for one model; stable across processes and restarts."""
    digest = hashlib.sha256(f"{model}\x00{patient_pseudonym}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % BUCKETS


def version_for_bucket(weights: Mapping[int, int], bucket: int) -> int:
    """The version whose share of the 10,000 buckets contains ``bucket``."""
    upper = 0
    for version in sorted(weights):
        upper += weights[version] * BUCKETS // 100
        if bucket < upper:
            return version
    raise ValueError(f"weights {dict(weights)} do not cover bucket {bucket}")


class UnknownModelError(Exception):
    """The request names a model that is not deployed."""


@dataclass(frozen=True)
class Routed:
    """A task for one model version and the topic it goes to."""

    task: RunInference
    topic: str


def route(
    request: RequestInference,
    specs: Mapping[str, ModelSpec],
    producer: Producer,
    now: datetime,
) -> Routed:
    """Choose the version for a request and build its RunInference task."""
    spec = specs.get(request.model)
    if spec is None:
        raise UnknownModelError(f"model {request.model!r} is not deployed (known: {sorted(specs)})")
    bucket = bucket_of(spec.name, request.patient_pseudonym)
    version = version_for_bucket(spec.routing.weights, bucket)
    task = RunInference(
        correlation_id=request.correlation_id,
        producer=producer,
        model_version=version,
        route=RouteDecision(reason="static-table", detail=f"bucket {bucket}"),
        routed_at=now,
        request=request,
    )
    return Routed(task=task, topic=model_task_topic(spec.name, version))
