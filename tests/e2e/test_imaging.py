"""Imaging end to end: a study announced in FHIR is fetched from a real PACS, scored on Triton by
the chest-opacity CNN and reported.

A separate stack (its own ports and state) serves deploy/models/*.yaml, the imaging spec
chest-opacity.yaml among them; Triton loads deploy/triton/models (chest-opacity-cnn among them)
and the stack's Orthanc holds the studies, stored by STOW-RS from the synthetic radiograph
generator.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import uuid
from typing import Any

import httpx
import pytest

from medmesh_cli.devstack.paths import run_dir
from medmesh_cli.devstack.radiographs import (
    CLEAR_FIXTURE_SEEDS,
    OPACITY_FIXTURE_SEEDS,
    synthetic_radiograph,
)
from medmesh_cli.devstack.stack import Stack, StackConfig
from medmesh_cli.devstack.studies import StudyIdentity, build_radiograph, imaging_study, stow
from medmesh_contracts import topics
from tests.conformance.report_checks import check_report_bundle
from tests.e2e.conftest import E2E_PORT_BASE, Record, TopicTap, e2e_ports

IMAGING_PORT_BASE = E2E_PORT_BASE + 600
OPACITY = "radiographic-opacity"


def _study_resource(
    identity: StudyIdentity, patient: str, dicomweb_url: str, modality: str = "DX"
) -> dict[str, Any]:
    """The ImagingStudy announcing ``identity``'s study, its endpoint the stack's PACS."""
    resource_id = f"cxr-{uuid.uuid4().hex[:8]}"
    return imaging_study(identity, resource_id, patient, dicomweb_url, modality)


def _resources(record: Record) -> dict[str, list[dict[str, Any]]]:
    found: dict[str, list[dict[str, Any]]] = {}
    for entry in record.json()["entry"]:
        found.setdefault(entry["resource"]["resourceType"], []).append(entry["resource"])
    return found


def _report_for(patient: str) -> Any:
    def matches(record: Record) -> bool:
        (report,) = _resources(record)["DiagnosticReport"]
        return bool(report["subject"]["reference"] == f"Patient/{patient}")

    return matches


def _findings(record: Record) -> set[str]:
    return {
        coding["code"]
        for observation in _resources(record).get("Observation", [])
        for coding in observation["code"]["coding"]
    }


async def _announce(client: httpx.AsyncClient, study: dict[str, Any]) -> httpx.Response:
    return await client.post(
        "/fhir/ImagingStudy",
        content=json.dumps(study).encode(),
        headers={"content-type": "application/fhir+json"},
    )


async def test_a_study_announced_in_fhir_gets_a_report_from_the_cnn() -> None:
    """Radiographs with and without an opacity, announced as ImagingStudy, are fetched from
    Orthanc, scored by the CNN on Triton and reported with the finding only where the opacity
    is; each report is valid and derived from its study. A CT study is refused with an
    OperationOutcome and no report."""
    state = run_dir("e2e-imaging")
    shutil.rmtree(state / "kafka", ignore_errors=True)
    stack = Stack(
        StackConfig(
            ports=e2e_ports(IMAGING_PORT_BASE),
            state_dir=state,
            kafka_heap="512m",
            partitions=1,
            with_fhir_server=False,  # reports are checked on Kafka; no delivery here
        )
    )
    try:
        try:
            await asyncio.to_thread(stack.start, 150)
        except Exception as exc:  # noqa: BLE001 -- re-raised as a failure naming the broken part
            pytest.fail(f"the imaging stack did not start: {exc}", pytrace=False)
        assert "chest-opacity-v1" in stack.services
        cases = {
            f"e2e-img-{uuid.uuid4().hex[:10]}": (seed, opacity)
            for seed, opacity in [(OPACITY_FIXTURE_SEEDS[0], True), (CLEAR_FIXTURE_SEEDS[0], False)]
        }
        identities = {patient: StudyIdentity.new(patient) for patient in cases}
        datasets = [
            build_radiograph(synthetic_radiograph(seed, opacity), identities[patient])
            for patient, (seed, opacity) in cases.items()
        ]
        await asyncio.to_thread(stow, stack.config.dicomweb_url, datasets)
        tap = TopicTap(stack.config.bootstrap, (topics.REPORTS_DIAGNOSTIC,))
        await tap.start()
        try:
            async with httpx.AsyncClient(base_url=stack.config.ingest_url, timeout=30) as client:
                studies = {}
                for patient, identity in identities.items():
                    studies[patient] = _study_resource(identity, patient, stack.config.dicomweb_url)
                    answer = await _announce(client, studies[patient])
                    assert answer.status_code == 202, answer.text
                ct_patient = f"e2e-img-{uuid.uuid4().hex[:10]}"
                ct = _study_resource(
                    StudyIdentity.new(ct_patient), ct_patient, stack.config.dicomweb_url, "CT"
                )
                refused = await _announce(client, ct)
            assert refused.status_code == 422, refused.text
            assert refused.json()["resourceType"] == "OperationOutcome"
            for patient, (_, opacity) in cases.items():
                report = await tap.wait_for(
                    topics.REPORTS_DIAGNOSTIC, _report_for(patient), timeout_s=60
                )
                assert check_report_bundle(report.json()) == []
                assert (OPACITY in _findings(report)) is opacity, (patient, _findings(report))
                study_reference = f"ImagingStudy/{studies[patient]['id']}"
                derived = {
                    d["reference"]
                    for o in _resources(report).get("Observation", [])
                    for d in o.get("derivedFrom", [])
                }
                assert study_reference in derived
                (diagnostic,) = _resources(report)["DiagnosticReport"]
                assert diagnostic["imagingStudy"] == [{"reference": study_reference}]
            await asyncio.sleep(1.0)  # time for a stray report, were there one
            assert tap.matching(topics.REPORTS_DIAGNOSTIC, _report_for(ct_patient)) == []
        finally:
            await tap.stop()
    finally:
        await asyncio.to_thread(stack.stop)
