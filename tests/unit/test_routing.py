"""Routing: sticky buckets, weights from the registry, rules, shadows, readiness and split accuracy."""

from __future__ import annotations

import itertools
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import pytest
from pydantic import ValidationError

from medmesh_contracts import headers as h
from medmesh_contracts.events import (
    Producer,
    RequestInference,
    RunInference,
    SourceContext,
    routing_headers,
    schema_of,
    to_wire,
)
from medmesh_contracts.lifecycle import (
    ModelDeployment,
    RoutingRule,
    VersionDeployment,
    advance,
    deploy_version,
    seed_deployment,
)
from medmesh_contracts.modelspec import load_spec
from medmesh_router.routing import (
    BUCKETS,
    NotARequestError,
    RouteKey,
    RoutingTable,
    UnknownModelError,
    bucket_of,
    build_table,
    route,
    route_key,
    route_wire,
)
from tests.factories import make_request

SPEC = load_spec(Path(__file__).resolve().parents[2] / "deploy" / "models" / "deterioration.yaml")
PRODUCER = Producer(service="router", instance="test")
NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
MODEL = "deterioration"


def _deployment(weights: dict[int, int], **extra: object) -> ModelDeployment:
    """A registry record with v1 stable and the other weighted versions as canaries."""
    seeded = seed_deployment(MODEL, weights, PRODUCER, NOW, "test")
    return seeded.model_copy(update=extra) if extra else seeded


def _table(weights: dict[int, int]) -> RoutingTable:
    return build_table(_deployment(weights), _all_up)


def _all_up(_version: int) -> bool:
    """Every version can serve."""
    return True


def test_bucket_is_stable_and_in_range() -> None:
    """The same pseudonym always hashes to the same bucket in 0..9999."""
    first = bucket_of(MODEL, "pabc")
    assert first == bucket_of(MODEL, "pabc")
    assert 0 <= first < BUCKETS


def test_buckets_spread_over_the_range() -> None:
    """Many pseudonyms fill the buckets roughly evenly (no clustering in one half)."""
    buckets = [bucket_of(MODEL, f"p{i}") for i in range(4000)]
    lower_half = sum(b < BUCKETS // 2 for b in buckets)
    assert 1800 < lower_half < 2200


def test_stable_owns_the_low_buckets_and_the_canary_the_top() -> None:
    """With v1 stable at 90 % and v2 canary at 10 %, buckets below 9000 go to v1, the rest v2."""
    table = _table({1: 90, 2: 10})
    assert table.version_for_bucket(0) == 1
    assert table.version_for_bucket(8999) == 1
    assert table.version_for_bucket(9000) == 2
    assert table.version_for_bucket(9999) == 2
    assert table.weights == {1: 90, 2: 10}


def test_raising_a_canary_keeps_its_patients() -> None:
    """Going from 5 % to 10 % on v2 keeps every patient already on v2 there (monotonic)."""
    before, after = _table({1: 95, 2: 5}), _table({1: 90, 2: 10})
    patients = [f"p{i}" for i in range(2000)]
    on_canary = [p for p in patients if before.version_for_bucket(bucket_of(MODEL, p)) == 2]
    assert on_canary
    assert all(after.version_for_bucket(bucket_of(MODEL, p)) == 2 for p in on_canary)


def test_split_at_ten_percent_is_accurate_sticky_and_monotonic() -> None:
    """20,000 requests over 5,000 patients at a 10 % canary: 10 % ± 1.5 %, one version per
    patient, and every step 5 -> 10 -> 25 -> 50 keeps each canary patient on the canary."""
    patients = [f"pseudo-{i:05d}" for i in range(5000)]
    deployment = deploy_version(_deployment({1: 100}), 2, PRODUCER, NOW, "test")
    tables: list[RoutingTable] = []
    for _ in range(4):  # steps 5, 10, 25, 50
        deployment = advance(deployment, PRODUCER, NOW, "test")
        tables.append(build_table(deployment, _all_up))
    at_ten = {MODEL: tables[1]}
    assert at_ten[MODEL].weights == {1: 90, 2: 10}
    seen: dict[str, set[int]] = {p: set() for p in patients}
    counts: Counter[int] = Counter()
    for i in range(20_000):
        patient = patients[(i * 7919) % len(patients)]  # every patient 4 times, interleaved
        request = make_request(patient_pseudonym=patient, correlation_id=f"c{i}")
        version = route(request, at_ten, PRODUCER, NOW).primary.task.model_version
        seen[patient].add(version)
        counts[version] += 1
    assert abs(counts[2] / 20_000 - 0.10) <= 0.015, counts
    assert all(len(versions) == 1 for versions in seen.values())
    for lower, higher in itertools.pairwise(tables):
        for patient in patients:
            bucket = bucket_of(MODEL, patient)
            if lower.version_for_bucket(bucket) == 2:
                assert higher.version_for_bucket(bucket) == 2, (patient, lower.weights)


def test_route_builds_a_task_for_the_bucket_version() -> None:
    """The seeded 100 % v1 table routes to the v1 task topic with the request inside."""
    request = make_request()
    routed = route(request, {MODEL: _table({1: 100})}, PRODUCER, NOW).primary
    assert routed.topic == "medmesh.model.deterioration.v1.tasks"
    assert routed.task.model_version == 1
    assert routed.task.request == request
    assert routed.task.correlation_id == request.correlation_id
    assert routed.task.route.reason == "bucket"


def test_route_rejects_a_model_that_is_not_deployed() -> None:
    """A request for an unknown model raises UnknownModelError naming the model."""
    request = make_request().model_copy(update={"model": "sepsis"})
    with pytest.raises(UnknownModelError, match="sepsis"):
        route(request, {MODEL: _table({1: 100})}, PRODUCER, NOW)


def test_rules_pin_a_version_by_site_ward_and_source_system() -> None:
    """A rule matching site and ward sends the request to its version whatever the bucket."""
    rule = RoutingRule(version=2, site="site-a", ward="icu")
    deployment = _deployment({1: 90, 2: 10}, rules=(rule,))
    tables = {MODEL: build_table(deployment, _all_up)}
    in_icu = make_request().model_copy(
        update={"source": SourceContext(channel="kafka", site="site-a", ward="icu")}
    )
    elsewhere = make_request().model_copy(
        update={"source": SourceContext(channel="kafka", site="site-a", ward="ward-3")}
    )
    pinned = route(in_icu, tables, PRODUCER, NOW).primary.task
    assert (pinned.model_version, pinned.route.reason) == (2, "rule")
    assert route(elsewhere, tables, PRODUCER, NOW).primary.task.route.reason == "bucket"
    assert rule.matches(SourceContext(channel="http", site="site-a", ward="icu", source_system="x"))
    assert not RoutingRule(version=2, source_system="epic").matches(in_icu.source)


def test_a_canary_that_cannot_serve_gives_its_share_to_stable() -> None:
    """With v2 not servable, a 25 % canary's buckets all route to v1, and its rules are dropped."""
    deployment = _deployment({1: 75, 2: 25}, rules=(RoutingRule(version=2, site="site-a"),))
    table = build_table(deployment, lambda version: version != 2)
    assert table.weights == {1: 100}
    assert table.rules == ()
    assert all(table.version_for_bucket(b) == 1 for b in range(0, BUCKETS, 7))


def test_shadow_versions_get_a_mirrored_copy_of_their_share() -> None:
    """A shadow at 100 % gets a copy marked 'shadow' of every request; the primary is stable."""
    deployment = _deployment(
        {1: 100},
        versions=(
            VersionDeployment(version=1, state="stable", weight=100),
            VersionDeployment(version=2, state="shadow", shadow_percent=100),
        ),
    )
    routed = route(make_request(), {MODEL: build_table(deployment, _all_up)}, PRODUCER, NOW)
    assert routed.primary.task.model_version == 1
    assert [s.task.model_version for s in routed.shadows] == [2]
    assert routed.shadows[0].task.route.reason == "shadow"
    assert routed.shadows[0].topic == "medmesh.model.deterioration.v2.tasks"
    assert build_table(deployment, lambda v: v != 2).shadows == ()


def _wire_headers(request: RequestInference) -> dict[str, str]:
    """The headers ingest writes beside a request."""
    return {
        h.CORRELATION_ID: request.correlation_id,
        h.SCHEMA: schema_of(RequestInference),
        **routing_headers(request),
    }


def test_routing_headers_carry_model_and_source_but_no_patient() -> None:
    """Ingest's routing headers name the model, site, ward and source system, nothing else."""
    request = make_request().model_copy(
        update={"source": SourceContext(channel="http", site="s1", ward="icu")}
    )
    assert routing_headers(request) == {h.MODEL: MODEL, h.SITE: "s1", h.WARD: "icu"}


def test_route_key_from_headers_equals_the_parsed_request() -> None:
    """Key and headers give the same routing attributes as parsing the value."""
    request = make_request().model_copy(
        update={"source": SourceContext(channel="kafka", site="s1", source_system="epic")}
    )
    from_headers = route_key(
        request.patient_pseudonym.encode(), _wire_headers(request), to_wire(request)
    )
    assert from_headers == RouteKey.from_request(request)


def test_route_key_parses_the_value_when_headers_are_missing() -> None:
    """A producer without routing headers is routed from its parsed value; garbage raises."""
    request = make_request()
    assert route_key(None, {}, to_wire(request)) == RouteKey.from_request(request)
    with pytest.raises(ValidationError):
        route_key(None, {}, b"not json")
    with pytest.raises(NotARequestError):
        route_key(b"p1", _wire_headers(request), b"[1, 2]")


@pytest.mark.parametrize(
    "value",
    [b"{ truncated", b'{"a": 1} trailing', b""],
    ids=["truncated", "trailing-garbage", "empty"],
)
def test_route_key_refuses_a_value_that_is_not_one_json_object(value: bytes) -> None:
    """With routing headers, a value that is not exactly one JSON object is not a request."""
    request = make_request()
    with pytest.raises(NotARequestError):
        route_key(request.patient_pseudonym.encode(), _wire_headers(request), value)


def test_route_key_refuses_headers_that_disagree_with_the_value() -> None:
    """A model, correlation id or key that differs from the value's is not routed on trust."""
    request = make_request()
    wire = to_wire(request)
    headers = _wire_headers(request)
    with pytest.raises(NotARequestError, match="model"):
        route_key(request.patient_pseudonym.encode(), {**headers, h.MODEL: "other"}, wire)
    with pytest.raises(NotARequestError, match="correlation_id"):
        route_key(request.patient_pseudonym.encode(), {**headers, h.CORRELATION_ID: "x"}, wire)
    with pytest.raises(NotARequestError, match="patient_pseudonym"):
        route_key(b"someone-else", headers, wire)


def test_wire_tasks_parse_to_what_route_builds() -> None:
    """route_wire's bytes are a valid RunInference equal to route()'s task, ids aside."""
    rule = RoutingRule(version=2, ward="icu")
    deployment = _deployment({1: 90, 2: 10}, rules=(rule,))
    tables = {MODEL: build_table(deployment, _all_up)}
    for index in range(50):
        ward = "icu" if index % 3 == 0 else "ward-7"
        request = make_request(patient_pseudonym=f"p{index}").model_copy(
            update={"source": SourceContext(channel="http", ward=ward)}
        )
        key = route_key(
            request.patient_pseudonym.encode(), _wire_headers(request), to_wire(request)
        )
        wire = route_wire(key, to_wire(request), tables, PRODUCER, NOW)
        parsed = route(request, tables, PRODUCER, NOW)
        expected = [parsed.primary, *parsed.shadows]
        assert [w.topic for w in wire] == [e.topic for e in expected]
        for task_wire, routed in zip(wire, expected, strict=True):
            task = RunInference.model_validate_json(task_wire.value)
            ignore = {"event_id", "occurred_at"}
            assert task.model_dump(exclude=ignore) == routed.task.model_dump(exclude=ignore)
