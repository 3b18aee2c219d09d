"""Shadow on the real stack: v2 mirrors every request, only v1 is reported, agreement is right.

The registry is changed through the same functions the ``medmesh models deploy --shadow`` CLI
uses, and left at 100 % v1 with no shadow when the test ends, whatever happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from medmesh_cli.devstack.stack import Stack
from medmesh_cli.models import write_change
from medmesh_contracts import topics
from medmesh_contracts.events import InferenceCompleted, Producer, utc_now
from medmesh_contracts.lifecycle import (
    LifecycleError,
    RolloutPolicy,
    decision,
    deploy_version,
    roll_back,
)
from medmesh_reporting.report import MODEL_VERSION_TAG_SYSTEM
from tests.conformance.report_checks import check_report_bundle
from tests.e2e.answers import requests_sent
from tests.e2e.conftest import Record, TopicTap, fixture_with_new_patient
from tests.e2e.router_view import current_deployment, wait_for_view

MODEL = "deterioration"
PRODUCER = Producer(service="e2e", instance="shadow-test")
BUNDLES = ("vitals-bundle-medium.json", "vitals-bundle-high.json")
PATIENTS_PER_BUNDLE = 6


@pytest.fixture(scope="module")
async def shadow_tap(stack: Stack) -> AsyncIterator[TopicTap]:
    """Reads the primary results, the shadow results and the reports from the beginning."""
    reader = TopicTap(
        stack.config.bootstrap,
        (topics.INFERENCE_RESULTS, topics.INFERENCE_SHADOW_RESULTS, topics.REPORTS_DIAGNOSTIC),
    )
    await reader.start()
    yield reader
    await reader.stop()


async def _restore_default(stack: Stack) -> None:
    """Retire the shadow (or whatever is rolled out): the router shows 100 % v1 and no shadow."""
    current = await current_deployment(stack, MODEL)
    with contextlib.suppress(LifecycleError):
        after = roll_back(current, PRODUCER, utc_now(), "e2e")
        audit = decision(current, after, "rollback", "e2e", "e2e shadow done", PRODUCER, utc_now())
        await write_change(stack.config.bootstrap, after, audit)
    await wait_for_view(
        stack,
        MODEL,
        lambda view: (
            view["effective_weights"] == {"1": 100}
            and all(v["state"] != "shadow" for v in view["deployment"]["versions"])
        ),
        "100 % v1 and no shadow",
    )


def _completed(record: Record) -> InferenceCompleted:
    return InferenceCompleted.model_validate_json(record.value)


def _resources(record: Record) -> dict[str, dict[str, Any]]:
    return {e["resource"]["resourceType"]: e["resource"] for e in record.json()["entry"]}


def _report_subject(record: Record) -> str:
    return str(_resources(record)["DiagnosticReport"]["subject"]["reference"])


async def _post(stack: Stack, payload: bytes) -> None:
    """POST a vitals Bundle; ingest answers that it sent one request for the model (202 +
    OperationOutcome, or 200 + response Bundle for a batch or transaction)."""
    async with httpx.AsyncClient(base_url=stack.config.ingest_url, timeout=30) as client:
        response = await client.post(
            "/fhir", content=payload, headers={"content-type": "application/fhir+json"}
        )
    assert list(requests_sent(response, payload).values()) == [MODEL]


async def _wait(what: str, found: Any, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if found():
            return
        await asyncio.sleep(0.1)
    pytest.fail(f"{what} within {timeout_s:.0f}s")


async def test_shadow_v2_is_never_reported_and_its_agreement_is_right(
    stack: Stack, shadow_tap: TopicTap
) -> None:
    """v2 in 100 % shadow: one v1 report per request, v2 only on shadow-results, agreement right."""
    try:
        current = await current_deployment(stack, MODEL)
        deployed = deploy_version(
            current,
            2,
            PRODUCER,
            utc_now(),
            "e2e",
            state="shadow",
            start=False,  # paused: the controller must not promote or roll back mid-test
            policy=RolloutPolicy(shadow_percent=100),
        )
        audit = decision(current, deployed, "deploy", "e2e", "e2e shadow", PRODUCER, utc_now())
        await write_change(stack.config.bootstrap, deployed, audit)
        since = deployed.changed_at
        await wait_for_view(
            stack,
            MODEL,
            lambda view: (
                view["deployment"]["revision"] == deployed.revision
                and view["versions"]["2"]["servable"]
                and view["effective_weights"] == {"1": 100}
            ),
            "v2 as a servable shadow beside 100 % v1",
        )

        subjects: list[str] = []
        for name in BUNDLES:
            for _ in range(PATIENTS_PER_BUNDLE):
                payload, patient = fixture_with_new_patient(name)
                await _post(stack, payload)
                subjects.append(f"Patient/{patient}")
        mine = set(subjects)

        def ours(record: Record) -> bool:
            return _completed(record).task.request.subject_reference in mine

        await _wait(
            "a report for every request",
            lambda: (
                {
                    _report_subject(r)
                    for r in shadow_tap.matching(topics.REPORTS_DIAGNOSTIC, lambda r: True)
                }
                >= mine
            ),
        )
        await _wait(
            "a v2 shadow result for every request",
            lambda: (
                {
                    _completed(r).task.request.subject_reference
                    for r in shadow_tap.matching(topics.INFERENCE_SHADOW_RESULTS, ours)
                }
                == mine
            ),
        )
        await asyncio.sleep(2.0)  # time for a duplicate report or a stray v2 result to show up

        # Exactly one report per request, and it is v1's.
        reports = shadow_tap.matching(
            topics.REPORTS_DIAGNOSTIC, lambda r: _report_subject(r) in mine
        )
        assert sorted(_report_subject(r) for r in reports) == sorted(subjects)
        for report in reports:
            assert check_report_bundle(report.json()) == []
            resources = _resources(report)
            versions = {v["type"]["text"]: v["value"] for v in resources["Device"]["version"]}
            assert versions["model version"] == "1"
            tags = resources["DiagnosticReport"]["meta"]["tag"]
            version_tags = [t["code"] for t in tags if t["system"] == MODEL_VERSION_TAG_SYSTEM]
            assert version_tags == [f"{MODEL}/v1"]

        # v2's results are on the shadow topic only; v1's on the results topic only.
        primaries = [_completed(r) for r in shadow_tap.matching(topics.INFERENCE_RESULTS, ours)]
        shadows = [
            _completed(r) for r in shadow_tap.matching(topics.INFERENCE_SHADOW_RESULTS, ours)
        ]
        assert {p.task.model_version for p in primaries} == {1}
        assert {p.task.route.reason for p in primaries} == {"bucket"}
        assert {s.task.model_version for s in shadows} == {2}
        assert {s.task.route.reason for s in shadows} == {"shadow"}

        # The agreement over every pair since the deploy, computed here from the two topics.
        by_id = {
            c.correlation_id: c
            for c in map(_completed, shadow_tap.matching(topics.INFERENCE_RESULTS, lambda r: True))
            if c.task.request.model == MODEL
        }
        mirrored = {
            c.correlation_id: c
            for c in map(
                _completed, shadow_tap.matching(topics.INFERENCE_SHADOW_RESULTS, lambda r: True)
            )
            if c.task.request.model == MODEL and c.task.routed_at >= since
        }
        pairs = [(by_id[cid], s) for cid, s in mirrored.items() if cid in by_id]
        assert len(pairs) >= len(subjects)
        assert len({p.outputs["RISK_BAND"][0] for p, _ in pairs}) >= 2  # not a trivial case
        same = sum(p.outputs["RISK_BAND"][0] == s.outputs["RISK_BAND"][0] for p, s in pairs)
        expected_agreement = same / len(pairs)
        expected_diff = sum(abs(p.outputs["SCORE"][0] - s.outputs["SCORE"][0]) for p, s in pairs)
        expected_diff /= len(pairs)

        view = await wait_for_view(
            stack,
            MODEL,
            lambda view: view["versions"]["2"]["figures"]["shadow_compared"] == len(pairs),
            f"{len(pairs)} shadow comparisons for v2",
        )
        figures = view["versions"]["2"]["figures"]
        assert figures["shadow_agreement"] == pytest.approx(expected_agreement)
        assert figures["shadow_mean_abs_diff"] == pytest.approx(expected_diff)
    finally:
        await _restore_default(stack)
