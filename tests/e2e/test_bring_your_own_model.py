"""Bring your own model, as the README's walkthrough does it, on a running stack.

A stack of its own starts with the Python versions only (deterioration v1, v2; ecg-rhythm v1).
Each test then does what a model owner does: drop an ONNX model folder into the Triton
repository and its version into the model spec, `medmesh models validate`, let the running stack
take them in (`medmesh up` reconciles every 3 s; the test calls the same `Stack.reconcile`), and
`medmesh models deploy`, which loads the model through Triton's repository API. Triton and every
service keep their process ids throughout: nothing is restarted.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import numpy as np
import onnxruntime
import pytest
import yaml
from typer.testing import CliRunner

from medmesh_cli.devstack.paths import repo_root, run_dir
from medmesh_cli.devstack.stack import Stack, StackConfig
from medmesh_cli.devstack.triton import is_model_ready
from medmesh_cli.main import app
from medmesh_contracts import topics
from tests.conformance.report_checks import check_report_bundle
from tests.e2e.answers import requests_sent
from tests.e2e.conftest import (
    E2E_PORT_BASE,
    Record,
    TopicTap,
    e2e_ports,
    fixture_with_new_patient,
)
from tests.e2e.router_view import wait_for_view
from tests.e2e.traffic import steady_traffic

BYOM_PORT_BASE = E2E_PORT_BASE + 800
SPECS = repo_root() / "deploy" / "models"
MODELS = repo_root() / "deploy" / "triton" / "models"
# The ONNX versions and the Triton folders that serve them: absent when the stack starts.
ONNX_VERSIONS = {"deterioration": (3, "deterioration-gbt"), "ecg-rhythm": (2, "ecg-rhythm-cnn")}
# The vitals fixtures' VITALS rows (tests/fixtures/fhir/EXPECTED.md), and their v3 band.
VITALS = {
    "vitals-bundle-low.json": ([16.0, 97.0, 0.0, 35.8, 124.0, 72.0, 0.0], "low"),
    "vitals-bundle-medium.json": ([22.0, 95.0, 1.0, 37.9, 112.0, 92.0, 0.0], "medium"),
    "vitals-bundle-high.json": ([24.0, 91.0, 1.0, 38.5, 98.0, 118.0, 1.0], "high"),
}
RATE_PER_S = 40


def _without_onnx_versions(document: dict[str, Any]) -> dict[str, Any]:
    number, _ = ONNX_VERSIONS[document["name"]]
    return document | {"versions": [v for v in document["versions"] if v["version"] != number]}


@pytest.fixture(scope="module")
async def byom_stack() -> AsyncIterator[Stack]:
    """A stack whose specs and Triton repository lack the ONNX versions, in its own folders."""
    state = run_dir("e2e-byom")
    shutil.rmtree(state, ignore_errors=True)
    specs, models = state / "specs", state / "models"
    specs.mkdir(parents=True)
    for path in SPECS.glob("*.yaml"):
        document = yaml.safe_load(path.read_text())
        if document["name"] in ONNX_VERSIONS:  # the other models are deployed as they are
            document = _without_onnx_versions(document)
        (specs / path.name).write_text(yaml.safe_dump(document))
    onnx_folders = {folder for _, folder in ONNX_VERSIONS.values()}
    shutil.copytree(
        MODELS, models, ignore=lambda _d, names: [n for n in names if n in onnx_folders]
    )
    config = StackConfig(
        ports=e2e_ports(BYOM_PORT_BASE),
        state_dir=state,
        partitions=1,
        specs_dir_override=specs,
        model_repository_override=models,
        with_fhir_server=False,  # reports are checked on Kafka; no delivery here
    )
    stack = Stack(config)
    try:
        await asyncio.to_thread(stack.start, 180)
    except Exception as exc:  # noqa: BLE001 -- re-raised as a failure that names the broken part
        pytest.fail(f"the bring-your-own-model stack did not start: {exc}", pytrace=False)
    try:
        yield stack
    finally:
        await asyncio.to_thread(stack.stop)


def _pids(stack: Stack) -> dict[str, int | None]:
    return {"triton": stack.triton.pid} | {n: p.pid for n, p in stack.services.items()}


def _cli(*arguments: str) -> str:
    result = CliRunner().invoke(app, list(arguments))
    assert result.exit_code == 0, result.output
    return result.output


async def _bring(stack: Stack, model: str) -> None:
    """The owner's steps: the Triton folder in, the version in the spec, validate, reconcile."""
    number, folder = ONNX_VERSIONS[model]
    shutil.copytree(MODELS / folder, stack.config.model_repository / folder)
    spec_file = stack.config.specs_dir / f"{model}.yaml"
    (spec_file).write_text((SPECS / f"{model}.yaml").read_text())
    output = _cli(
        "models",
        "validate",
        str(spec_file),
        "--repository",
        str(stack.config.model_repository),
        "--version",
        str(number),
    )
    assert "OK" in output
    done = await asyncio.to_thread(stack.reconcile)
    assert f"rendered Triton model {folder}" in done
    assert any(d.startswith(f"started {model}-v{number} ") for d in done), done


def _deploy(stack: Stack, model: str, steps: str, interval: str, min_requests: str) -> str:
    number, _ = ONNX_VERSIONS[model]
    ports = stack.config.ports
    return _cli(
        "models",
        "deploy",
        str(stack.config.specs_dir / f"{model}.yaml"),
        "--version",
        str(number),
        "--steps",
        steps,
        "--interval",
        interval,
        "--min-requests",
        min_requests,
        "--max-error-rate",
        "0.05",
        "--max-p99-ms",
        "10000",
        "--triton-url",
        f"http://127.0.0.1:{ports.triton_http}",
        "--repository",
        str(stack.config.model_repository),
        "--bootstrap",
        stack.config.bootstrap,
    )


def _resources(record: Record) -> dict[str, dict[str, Any]]:
    return {e["resource"]["resourceType"]: e["resource"] for e in record.json()["entry"]}


def _report_of(patient: str) -> Callable[[Record], bool]:
    def matches(record: Record) -> bool:
        report = _resources(record)["DiagnosticReport"]
        return bool(report["subject"]["reference"] == f"Patient/{patient}")

    return matches


async def _post_fixture(stack: Stack, tap: TopicTap, fixture: str, model: str) -> dict[str, Any]:
    """POST a fixture (with a patient of its own) to ingest, which answers that it sent one
    request for ``model``; its report's resources."""
    payload, patient = fixture_with_new_patient(fixture)
    async with httpx.AsyncClient(base_url=stack.config.ingest_url, timeout=30) as client:
        response = await client.post(
            "/fhir", content=payload, headers={"content-type": "application/fhir+json"}
        )
    assert list(requests_sent(response, payload).values()) == [model]
    record = await tap.wait_for(topics.REPORTS_DIAGNOSTIC, _report_of(patient), timeout_s=60)
    bundle: dict[str, Any] = record.json()
    assert check_report_bundle(bundle) == []
    return bundle


def _by_type(bundle: dict[str, Any], kind: str) -> dict[str, Any]:
    return next(e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == kind)


def _audit_of(version: int, action: str) -> Callable[[Record], bool]:
    return lambda r: r.json()["version"] == version and r.json()["action"] == action


async def test_an_onnx_version_is_hot_deployed_and_canaried_to_100_percent(
    byom_stack: Stack,
) -> None:
    """deterioration v3 (ONNX trees) is brought in, loaded and rolled 5 -> 100 % with no process
    restarted; at 100 % the vitals fixtures get v3 reports with onnxruntime's own scores."""
    stack = byom_stack
    before = _pids(stack)
    tap = TopicTap(stack.config.bootstrap, (topics.MODELS_AUDIT, topics.REPORTS_DIAGNOSTIC))
    await tap.start()
    try:
        await _bring(stack, "deterioration")
        assert not is_model_ready(
            f"127.0.0.1:{stack.config.ports.triton_http}", "deterioration-gbt"
        )
        async with steady_traffic(stack, RATE_PER_S, "byom"):
            output = await asyncio.to_thread(
                _deploy, stack, "deterioration", "5,10,25,50,100", "1.5", "5"
            )
            assert "loading deterioration-gbt" in output
            promoted = await tap.wait_for(
                topics.MODELS_AUDIT, _audit_of(3, "promote"), timeout_s=180
            )
        steps = [
            r.json()["weights_after"]["3"]
            for r in tap.matching(topics.MODELS_AUDIT, _audit_of(3, "step"))
        ]
        assert steps == [5, 10, 25, 50]
        assert promoted.json()["figures"][0]["error_rate"] == 0.0
        await wait_for_view(
            stack,
            "deterioration",
            lambda view: view["effective_weights"] == {"3": 100},
            "100 % v3",
        )
        session = onnxruntime.InferenceSession(
            str(MODELS / "deterioration-gbt" / "1" / "model.onnx"),
            providers=["CPUExecutionProvider"],
        )
        for fixture, (row, band) in VITALS.items():
            bundle = await _post_fixture(stack, tap, fixture, "deterioration")
            observation = _by_type(bundle, "Observation")
            expected = session.run(None, {"VITALS": np.asarray([row], dtype=np.float32)})[0]
            assert abs(observation["valueQuantity"]["value"] - expected[0][1] * 100) < 1e-3
            assert (
                _by_type(bundle, "DiagnosticReport")["conclusionCode"][0]["coding"][0]["code"]
                == band
            ), fixture
            assert "model deterioration v3" in _by_type(bundle, "DiagnosticReport")["conclusion"]
    finally:
        await tap.stop()
    after = _pids(stack)
    assert {name: after[name] for name in before} == before
    assert after["deterioration-v3"] is not None


async def test_a_classifier_version_reports_its_class_and_rollback_unloads_it(
    byom_stack: Stack,
) -> None:
    """ecg-rhythm v2 (ONNX CNN), hot deployed as a 99 % canary, reports the AF fixture as an
    irregular rhythm classification; a rollback unloads its Triton model, nothing restarts."""
    stack = byom_stack
    before = _pids(stack)
    triton_http = f"127.0.0.1:{stack.config.ports.triton_http}"
    tap = TopicTap(stack.config.bootstrap, (topics.REPORTS_DIAGNOSTIC,))
    await tap.start()
    try:
        await _bring(stack, "ecg-rhythm")
        # A long first step keeps v2 a canary (a 100 % step would promote it at once).
        await asyncio.to_thread(_deploy, stack, "ecg-rhythm", "99,100", "600", "1000")
        await wait_for_view(
            stack,
            "ecg-rhythm",
            lambda view: view["effective_weights"] == {"1": 1, "2": 99},
            "v2 99 %",
        )
        for _ in range(5):  # a new patient each time: one in a hundred is v1's
            bundle = await _post_fixture(stack, tap, "ecg-af.json", "ecg-rhythm")
            if "model ecg-rhythm v2" in _by_type(bundle, "DiagnosticReport")["conclusion"]:
                break
    finally:
        await tap.stop()
    observation = _by_type(bundle, "Observation")
    assert observation["code"]["coding"][0]["code"] == "8884-9"
    assert observation["valueCodeableConcept"]["coding"][0]["code"] == "irregular"
    report = _by_type(bundle, "DiagnosticReport")
    assert report["conclusionCode"][0]["coding"][0]["code"] == "irregular"
    assert "model ecg-rhythm v2" in report["conclusion"]
    output = await asyncio.to_thread(
        _cli,
        "models",
        "rollback",
        "ecg-rhythm",
        "--specs",
        str(stack.config.specs_dir),
        "--triton-url",
        f"http://{triton_http}",
        "--bootstrap",
        stack.config.bootstrap,
    )
    assert "ecg-rhythm-cnn unloaded" in output
    assert not is_model_ready(triton_http, "ecg-rhythm-cnn")
    assert is_model_ready(triton_http, "ecg-rhythm", 1)
    await wait_for_view(
        stack, "ecg-rhythm", lambda view: view["effective_weights"] == {"1": 100}, "v1 100 %"
    )
    after = _pids(stack)
    assert {name: after[name] for name in before} == before
