"""The console's views: the router's /models, the audit trail, dead letters, lag and reports."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any
from xml.etree import ElementTree

import pytest
from pydantic import ValidationError

from medmesh_console.svg import figures_text, step_plot
from medmesh_console.views import (
    ReportRecord,
    dead_letter_counts,
    dead_letter_reason,
    lag_rows,
    models_view,
    report_rows,
    timelines,
)
from medmesh_contracts.events import Producer, to_wire
from medmesh_contracts.lifecycle import (
    LifecycleAction,
    LifecycleDecision,
    VersionFigures,
    deploy_version,
    seed_deployment,
)

T0 = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)
PRODUCER = Producer(service="test", instance="t")
SUBJECT = "Patient/SUBJECT-REFERENCE-123"


def router_status() -> dict[str, Any]:
    """What the router's GET /models answers for one model with v2 in canary at 10 %."""
    seeded = seed_deployment("deterioration", {1: 100}, PRODUCER, T0, "seed")
    deployed = deploy_version(seeded, 2, PRODUCER, T0, "ops")
    figures = VersionFigures(
        version=2, window_s=60, requests=120, failures=2, error_rate=2 / 120, p99_ms=35.0
    )
    return {
        "at": T0.isoformat(),
        "models": {
            "deterioration": {
                "deployment": json.loads(to_wire(deployed)),
                "effective_weights": {"1": 90, "2": 10},
                "next_judgement_in_s": 12.5,
                "versions": {
                    "1": {"servable": True, "live_workers": 1, "figures": None},
                    "2": {
                        "servable": True,
                        "live_workers": 2,
                        "figures": figures.model_dump(mode="json"),
                    },
                },
            }
        },
        "unreadable_outcomes": 0,
    }


def audit(
    minute: int,
    action: LifecycleAction,
    version: int | None,
    after: dict[int, int],
    model: str = "deterioration",
    agreement: float | None = None,
) -> LifecycleDecision:
    """One lifecycle decision ``minute`` minutes after T0."""
    at = T0 + timedelta(minutes=minute)
    figures = (
        ()
        if version is None
        else (
            VersionFigures(
                version=version,
                window_s=60,
                requests=100 + minute,
                failures=0,
                error_rate=0.0,
                p99_ms=20.0,
                shadow_compared=50 if agreement is not None else 0,
                shadow_agreement=agreement,
            ),
        )
    )
    return LifecycleDecision(
        correlation_id=f"rollout-{minute}",
        producer=PRODUCER,
        occurred_at=at,
        model=model,
        action=action,
        version=version,
        actor="router",
        reason=f"{action} at minute {minute}",
        revision=minute + 1,
        weights_before={},
        weights_after=after,
        figures=figures,
        decided_at=at,
    )


def test_models_view_shows_states_weights_and_figures_per_version() -> None:
    """Each version carries its registry state and weight, the effective weight and its figures."""
    (model,) = models_view(router_status())
    assert (model.name, model.phase, model.rollout_version) == ("deterioration", "progressing", 2)
    v1, v2 = model.versions
    assert (v1.version, v1.state, v1.effective_weight, v1.figures) == (1, "stable", 90, None)
    assert (v2.state, v2.effective_weight, v2.live_workers) == ("canary", 10, 2)
    assert v2.figures is not None
    assert v2.figures.requests == 120
    assert model.next_judgement_in_s == 12.5


def test_models_view_refuses_a_record_that_is_not_a_deployment() -> None:
    """A /models answer whose deployment does not validate is an error, not an empty page."""
    status = router_status()
    status["models"]["deterioration"]["deployment"]["versions"] = "nonsense"
    with pytest.raises(ValidationError):
        models_view(status)


def test_a_deploy_starts_a_rollout_and_its_decisions_follow_it() -> None:
    """Decisions split into rollouts at each deploy, per model, the latest started first."""
    decisions = [
        audit(0, "seed", None, {1: 100}),
        audit(0, "readiness-restored", 1, {1: 100}),
        audit(1, "deploy", 2, {1: 100}),
        audit(2, "step", 2, {1: 95, 2: 5}),
        audit(3, "hold", 2, {1: 95, 2: 5}),
        audit(3, "readiness-lost", 1, {1: 95, 2: 5}),
        audit(4, "rollback", 2, {1: 100}),
        audit(5, "deploy", 3, {1: 100}, agreement=0.97),
        audit(6, "promote", 3, {3: 100}, agreement=0.96),
        audit(2, "deploy", 7, {6: 100}, model="other"),
    ]
    found = timelines(decisions[4:] + decisions[:4])  # out of order, the seed before its readiness
    assert [(t.model, t.version, t.outcome) for t in found] == [
        ("deterioration", 3, "promote"),
        ("other", 7, "deploy"),
        ("deterioration", 2, "rollback"),
        ("deterioration", None, "readiness-restored"),
    ]
    rollback = found[2]
    assert [d.action for d in rollback.decisions] == [
        "deploy",
        "step",
        "hold",
        "readiness-lost",
        "rollback",
    ]
    assert [rollback.weight_after(d) for d in rollback.decisions] == [0, 5, 5, 5, 0]


def test_the_step_plot_draws_one_marker_per_decision_with_its_figures() -> None:
    """The SVG has a step line, a numbered marker per decision, and the figures in its tooltip."""
    timeline = timelines(
        [
            audit(0, "deploy", 3, {1: 100}),
            audit(1, "step", 3, {1: 90, 3: 10}, agreement=0.97),
            audit(2, "promote", 3, {3: 100}),
        ]
    )[0]
    svg = step_plot(timeline)
    root = ElementTree.fromstring(svg)  # noqa: S314 -- our own output, checked to be well-formed
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    assert svg.count("<circle") == 3
    assert "shadow agreement 97.0% of 50" in svg
    # 0 % at the deploy (y 184), 10 % after the step halfway (y 167.2), 100 % after the
    # promotion at the right edge (y 16), held there
    assert 'd="M48.0,184.0H372.0V167.2H696.0V16.0H696"' in svg


def test_the_step_plot_escapes_a_hostile_reason() -> None:
    """A reason with markup is text in the tooltip, never an element."""
    hostile = audit(0, "deploy", 3, {1: 100}).model_copy(update={"reason": "<script>x</script>"})
    svg = step_plot(timelines([hostile])[0])
    assert "<script>" not in svg
    assert "&lt;script&gt;" in svg


def test_figures_read_as_words() -> None:
    """Requests, error rate, p99 and shadow agreement of a window are spelled out."""
    figures = VersionFigures(
        version=2,
        window_s=60,
        requests=200,
        failures=3,
        error_rate=0.015,
        p99_ms=41.6,
        shadow_compared=80,
        shadow_agreement=0.9375,
    )
    assert figures_text(figures) == (
        "v2: 200 requests in 60 s, error rate 1.5%, p99 42 ms, shadow agreement 93.8% of 80"
    )


def test_dead_letters_are_counted_per_topic_and_reason() -> None:
    """Equal reasons add up per topic; a value that is not JSON is counted as such."""
    reason = json.dumps({"reason": "no such model"}).encode()
    other = json.dumps({"reason": "bad schema"}).encode()
    values = [("dl.router", reason), ("dl.router", reason), ("dl.router", other), ("dl.x", b"{")]
    counts = dead_letter_counts((topic, dead_letter_reason(value)) for topic, value in values)
    assert [(c.topic, c.reason, c.count) for c in counts] == [
        ("dl.router", "no such model", 2),
        ("dl.router", "bad schema", 1),
        ("dl.x", "not JSON", 1),
    ]


def test_dead_letter_reasons_lose_the_values_pydantic_quotes() -> None:
    """A validation error's quoted input is hidden, so equal errors add up and no value shows."""
    error = '1 validation error for X [type=json_invalid, input_value=b\'{{"name": "{}"\', input_type=bytes]'
    values = [json.dumps({"reason": error.format(n)}).encode() for n in ("Jane", "John")]
    (count,) = dead_letter_counts([("dl.router", dead_letter_reason(v)) for v in values])
    assert count.count == 2
    assert "Jane" not in count.reason
    assert "input_value=(hidden), input_type=bytes" in count.reason


def test_lag_rows_list_every_group_and_topic() -> None:
    """Lag is listed per group, then topic, in name order; a group without offsets says so."""
    rows = lag_rows(
        {"medmesh-router": {"b": 0, "a": 4}, "medmesh-ingest": {"c": 1}, "medmesh-idle": {}}
    )
    assert [(r.group, r.topic, r.lag) for r in rows] == [
        ("medmesh-idle", None, None),
        ("medmesh-ingest", "c", 1),
        ("medmesh-router", "a", 4),
        ("medmesh-router", "b", 0),
    ]


def report_bundle(band: str) -> bytes:
    """A report Bundle as reporting publishes it, with a subject reference and a patient name."""
    observation = {
        "resourceType": "Observation",
        "subject": {"reference": SUBJECT, "display": "Jane Example"},
        "valueQuantity": {"value": 0.42, "code": "%"},
        "interpretation": [{"coding": [{"system": "urn:medmesh:band", "code": band}]}],
    }
    device = {
        "resourceType": "Device",
        "deviceName": [{"name": "deterioration", "type": "model-name"}],
        "version": [{"value": "2"}],
    }
    return json.dumps({"entry": [{"resource": observation}, {"resource": device}]}).encode()


def test_report_rows_keep_pseudonym_model_version_band_and_time_only() -> None:
    """A row has no subject reference, name or score; the newest come first, up to the limit."""
    records = [
        ReportRecord(b"pseudo-a", report_bundle("low"), {}, 1_000),
        ReportRecord(b"pseudo-b", report_bundle("high"), {}, 3_000),
        ReportRecord(b"pseudo-c", b"not a bundle", {}, 2_000),
        ReportRecord(b"pseudo-d", report_bundle("medium"), {}, 2_000),
    ]
    rows, unreadable = report_rows(records, limit=2)
    assert unreadable == 1
    assert [(r.pseudonym, r.band, r.model, r.version) for r in rows] == [
        ("pseudo-b", "high", "deterioration", "2"),
        ("pseudo-d", "medium", "deterioration", "2"),
    ]
    shown = repr(rows)
    assert SUBJECT not in shown
    assert "Jane" not in shown
    assert "0.42" not in shown
