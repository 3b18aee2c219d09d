"""Adding a model needs no change to any service's code: only a spec and a Triton folder.

A second, separate stack (its own ports and state) serves deploy/models/*.yaml plus the fixture
spec tests/fixtures/models/specs/shock-index.yaml, and a Triton repository holding
deploy/triton/models/* plus tests/fixtures/models/triton/shock-index; the services are the
same code as always. Copies live in temporary folders: deploy/ is never touched.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

import httpx
import pytest

from medmesh_cli.devstack.paths import repo_root, run_dir
from medmesh_cli.devstack.stack import Stack, StackConfig
from medmesh_contracts import topics
from tests.conformance.report_checks import check_report_bundle
from tests.e2e.answers import requests_sent
from tests.e2e.conftest import E2E_PORT_BASE, Record, TopicTap, e2e_ports, fixture_with_new_patient

FIXTURE_MODELS = Path(__file__).resolve().parents[1] / "fixtures" / "models"
SECOND_PORT_BASE = E2E_PORT_BASE + 500
BUNDLE = "vitals-bundle-medium.json"  # heart rate 92 /min, systolic BP 112 mm[Hg]
SHOCK_INDEX = 92 / 112
HEART_RATE, SYSTOLIC_BP = "8867-4", "8480-6"


def _model_folders(tmp: Path) -> tuple[Path, Path]:
    """Temporary copies: (specs folder, Triton model repository), each with the fixture added."""
    specs, repository = tmp / "specs", tmp / "triton-models"
    specs.mkdir()
    for spec in [*(repo_root() / "deploy" / "models").glob("*.yaml"), FIXTURE_MODELS / "specs"]:
        for file in [spec] if spec.is_file() else sorted(spec.glob("*.yaml")):
            shutil.copy2(file, specs / file.name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(repo_root() / "deploy" / "triton" / "models", repository, ignore=ignore)
    for model in (FIXTURE_MODELS / "triton").iterdir():
        shutil.copytree(model, repository / model.name, ignore=ignore)
    return specs, repository


def _only_heart_rate_and_systolic_bp(payload: bytes) -> bytes:
    """The Bundle with its Patient and only the heart rate and systolic BP Observations."""
    bundle = json.loads(payload)

    def kept(entry: dict[str, Any]) -> bool:
        resource = entry["resource"]
        if resource["resourceType"] != "Observation":
            return bool(resource["resourceType"] == "Patient")
        codes = {c["code"] for c in resource["code"]["coding"]}
        return bool(codes & {HEART_RATE, SYSTOLIC_BP})

    bundle["entry"] = [e for e in bundle["entry"] if kept(e)]
    return json.dumps(bundle).encode()


def _resources(record: Record) -> dict[str, dict[str, Any]]:
    return {e["resource"]["resourceType"]: e["resource"] for e in record.json()["entry"]}


def _report_of(model_code: str, patient: str) -> Any:
    def matches(record: Record) -> bool:
        report = _resources(record)["DiagnosticReport"]
        return bool(
            report["subject"]["reference"] == f"Patient/{patient}"
            and report["code"]["coding"][0]["code"] == model_code
        )

    return matches


async def _post(stack: Stack, payload: bytes) -> list[str]:
    """POST the batch; the models ingest says it sent requests for (200 + batch-response)."""
    async with httpx.AsyncClient(base_url=stack.config.ingest_url, timeout=30) as client:
        response = await client.post(
            "/fhir", content=payload, headers={"content-type": "application/fhir+json"}
        )
    return sorted(requests_sent(response, payload).values())


def _check_shock_index_report(report: Record) -> None:
    assert check_report_bundle(report.json()) == []
    resources = _resources(report)
    identifiers = [i["value"] for i in resources["Device"]["identifier"]]
    assert "shock-index/v1" in identifiers
    observation = resources["Observation"]
    assert observation["valueQuantity"]["value"] == pytest.approx(SHOCK_INDEX, rel=1e-5)
    bands = [c["code"] for i in observation["interpretation"] for c in i["coding"]]
    assert "medium" in bands  # 0.82: from 0.7 to below 1.0


async def test_a_model_added_from_fixtures_is_served_and_reported(tmp_path: Path) -> None:
    """A spec plus a Triton folder, no code change: the new model's reports arrive beside NEWS2's."""
    specs, repository = _model_folders(tmp_path)
    state = run_dir("e2e-second-model")
    shutil.rmtree(state / "kafka", ignore_errors=True)  # a fresh broker: no earlier run's topics
    second = Stack(
        StackConfig(
            ports=e2e_ports(SECOND_PORT_BASE),
            state_dir=state,
            kafka_heap="512m",
            partitions=1,
            specs_dir_override=specs,
            model_repository_override=repository,
            with_fhir_server=False,  # reports are checked on Kafka; no delivery here
        )
    )
    try:
        try:
            await asyncio.to_thread(second.start, 120)
        except Exception as exc:  # noqa: BLE001 -- re-raised as a failure that names the broken part
            pytest.fail(f"the second stack did not start: {exc}", pytrace=False)
        assert "shock-index-v1" in second.services
        tap = TopicTap(second.config.bootstrap, (topics.REPORTS_DIAGNOSTIC,))
        await tap.start()
        try:
            # Heart rate and systolic BP only: the shock index is scored, NEWS2 is not (yet).
            full, partial_patient = fixture_with_new_patient(BUNDLE)
            assert await _post(second, _only_heart_rate_and_systolic_bp(full)) == ["shock-index"]
            report = await tap.wait_for(
                topics.REPORTS_DIAGNOSTIC, _report_of("shock-index", partial_patient)
            )
            _check_shock_index_report(report)

            # Every vital sign: both models report for the same Bundle.
            payload, patient = fixture_with_new_patient(BUNDLE)
            assert await _post(second, payload) == ["deterioration", "shock-index"]
            shock = await tap.wait_for(
                topics.REPORTS_DIAGNOSTIC, _report_of("shock-index", patient)
            )
            _check_shock_index_report(shock)
            news2 = await tap.wait_for(
                topics.REPORTS_DIAGNOSTIC, _report_of("deterioration-risk", patient)
            )
            assert check_report_bundle(news2.json()) == []
            assert _resources(news2)["Observation"]["valueInteger"] == 6

            await asyncio.sleep(1.0)  # time for a stray report to show up, were there one
            for model_code, who, count in (
                ("shock-index", partial_patient, 1),
                ("deterioration-risk", partial_patient, 0),
                ("shock-index", patient, 1),
                ("deterioration-risk", patient, 1),
            ):
                found = tap.matching(topics.REPORTS_DIAGNOSTIC, _report_of(model_code, who))
                assert len(found) == count, (model_code, who)
        finally:
            await tap.stop()
    finally:
        await asyncio.to_thread(second.stop)
