"""Routing: sticky buckets and the static routing table."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from medmesh_contracts.events import Producer
from medmesh_contracts.modelspec import load_spec
from medmesh_router.routing import (
    BUCKETS,
    UnknownModelError,
    bucket_of,
    route,
    version_for_bucket,
)
from tests.factories import make_request

SPEC = load_spec(Path(__file__).resolve().parents[2] / "deploy" / "models" / "deterioration.yaml")
PRODUCER = Producer(service="router", instance="test")
NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


def test_bucket_is_stable_and_in_range() -> None:
    """The same pseudonym always hashes to the same bucket in 0..9999."""
    first = bucket_of("deterioration", "pabc")
    assert first == bucket_of("deterioration", "pabc")
    assert 0 <= first < BUCKETS


def test_buckets_spread_over_the_range() -> None:
    """Many pseudonyms fill the buckets roughly evenly (no clustering in one half)."""
    buckets = [bucket_of("deterioration", f"p{i}") for i in range(4000)]
    lower_half = sum(b < BUCKETS // 2 for b in buckets)
    assert 1800 < lower_half < 2200


def test_version_for_bucket_follows_weights_in_version_order() -> None:
    """With 90/10 weights, buckets below 9000 go to v1 and the rest to v2."""
    weights = {1: 90, 2: 10}
    assert version_for_bucket(weights, 0) == 1
    assert version_for_bucket(weights, 8999) == 1
    assert version_for_bucket(weights, 9000) == 2
    assert version_for_bucket(weights, 9999) == 2


def test_raising_a_canary_keeps_its_patients() -> None:
    """Going from 5% to 10% on v2 keeps every patient already on v2 there (monotonic)."""
    before = {1: 95, 2: 5}
    after = {1: 90, 2: 10}
    patients = [f"p{i}" for i in range(2000)]
    on_canary = [p for p in patients if version_for_bucket(before, bucket_of("m", p)) == 2]
    assert on_canary
    assert all(version_for_bucket(after, bucket_of("m", p)) == 2 for p in on_canary)


def test_route_builds_a_task_for_the_static_table_version() -> None:
    """The spec's 100% v1 table routes to the v1 task topic with the request inside."""
    request = make_request()
    routed = route(request, {SPEC.name: SPEC}, PRODUCER, NOW)
    assert routed.topic == "medmesh.model.deterioration.v1.tasks"
    assert routed.task.model_version == 1
    assert routed.task.request == request
    assert routed.task.correlation_id == request.correlation_id
    assert routed.task.route.reason == "static-table"


def test_route_rejects_a_model_that_is_not_deployed() -> None:
    """A request for an unknown model raises UnknownModelError naming the model."""
    request = make_request().model_copy(update={"model": "sepsis"})
    with pytest.raises(UnknownModelError, match="sepsis"):
        route(request, {SPEC.name: SPEC}, PRODUCER, NOW)
