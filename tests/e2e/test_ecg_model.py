"""The ECG rhythm model end to end: FHIR SampledData in, an ecg-rhythm DiagnosticReport out.

The session stack serves every spec in deploy/models, so the ecg-rhythm v1 worker and Triton
model run beside deterioration's with no service knowing the model by name. The fixtures are
synthetic lead-II ECGs (tests/fixtures/fhir/make_ecg_fixtures.py): sinus rhythm and AF-like.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiokafka import AIOKafkaProducer

from medmesh_cli.devstack.stack import Stack
from medmesh_contracts import headers as h
from medmesh_contracts import topics
from tests.conformance.report_checks import check_report_bundle
from tests.e2e.answers import requests_sent
from tests.e2e.conftest import Record, TopicTap, fixture_with_new_patient

R4B = "application/fhir+json"
R5 = "application/fhir+json; fhirVersion=5.0"
REPORT_CODE = "ecg-rhythm-screen"
RHYTHM_BANDS = "https://medmesh.dev/fhir/CodeSystem/rhythm-band"
# Kafka record batch (format v2): base offset i64, length i32, leader epoch i32, magic i8,
# crc u32, attributes i16 whose low 3 bits are the codec (0 none, 1 gzip, 2 snappy, 3 lz4, 4 zstd).
_BATCH_HEADER = struct.Struct(">qiiBIh")


def _resources(record: Record) -> dict[str, dict[str, Any]]:
    return {e["resource"]["resourceType"]: e["resource"] for e in record.json()["entry"]}


def _ecg_report_of(patient: str) -> Any:
    def matches(record: Record) -> bool:
        report = _resources(record)["DiagnosticReport"]
        return bool(
            report["subject"]["reference"] == f"Patient/{patient}"
            and report["code"]["coding"][0]["code"] == REPORT_CODE
        )

    return matches


def _band(report: Record) -> str:
    observation = _resources(report)["Observation"]
    (band,) = [
        c["code"]
        for i in observation["interpretation"]
        for c in i["coding"]
        if c["system"] == RHYTHM_BANDS
    ]
    return str(band)


async def _post(stack: Stack, payload: bytes, content_type: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=stack.config.ingest_url, timeout=30) as client:
        return await client.post("/fhir", content=payload, headers={"content-type": content_type})


@pytest.mark.parametrize(
    ("fixture", "content_type", "band"),
    [
        ("ecg-sinus.json", R4B, "regular"),
        ("ecg-af.json", R4B, "irregular"),
        ("ecg-sinus-r5.json", R5, "regular"),
        ("ecg-af-r5.json", R5, "irregular"),
    ],
    ids=["sinus-R4B", "af-R4B", "sinus-R5", "af-R5"],
)
async def test_posted_ecg_becomes_one_rhythm_report_with_its_band(
    stack: Stack, tap: TopicTap, fixture: str, content_type: str, band: str
) -> None:
    """An ECG Observation posted to ingest (a transaction: 200 + transaction-response naming
    one ecg-rhythm request) comes back as one conformant ecg-rhythm report (R5 when sent as R5)
    whose band is its rhythm's; no deterioration report is made of it."""
    payload, patient = fixture_with_new_patient(fixture)
    response = await _post(stack, payload, content_type)
    assert list(requests_sent(response, payload).values()) == ["ecg-rhythm"]
    report = await tap.wait_for(topics.REPORTS_DIAGNOSTIC, _ecg_report_of(patient))
    assert report.headers[h.CORRELATION_ID] == response.headers[h.CORRELATION_ID]
    assert check_report_bundle(report.json()) == []
    assert report.headers[h.SCHEMA] == (h.FHIR_R5_JSON if content_type == R5 else h.FHIR_R4B_JSON)
    assert _band(report) == band
    observation = _resources(report)["Observation"]
    assert observation["category"][0]["coding"][0]["code"] == "procedure"
    score = observation["valueQuantity"]["value"]
    assert (score >= 50) == (band == "irregular")
    heart_rate = observation["component"][0]
    assert heart_rate["code"]["coding"][0]["code"] == "8867-4"
    assert 50 <= heart_rate["valueQuantity"]["value"] <= 120
    device_ids = [i["value"] for i in _resources(report)["Device"]["identifier"]]
    assert device_ids == ["ecg-rhythm/v1"]
    for_patient = tap.matching(
        topics.REPORTS_DIAGNOSTIC,
        lambda r: _resources(r)["DiagnosticReport"]["subject"]["reference"] == f"Patient/{patient}",
    )
    assert len(for_patient) == 1


async def test_inbound_topic_ecg_becomes_a_report(
    stack: Stack, tap: TopicTap, producer: AIOKafkaProducer
) -> None:
    """The AF-like ECG published to medmesh.fhir.inbound is reported irregular too."""
    payload, patient = fixture_with_new_patient("ecg-af.json")
    await producer.send_and_wait(topics.FHIR_INBOUND, payload, key=patient.encode())
    report = await tap.wait_for(topics.REPORTS_DIAGNOSTIC, _ecg_report_of(patient))
    assert _band(report) == "irregular"
    assert check_report_bundle(report.json()) == []


async def test_flat_ecg_is_reported_unreadable(stack: Stack, tap: TopicTap) -> None:
    """A 10 s flat line (leads off) is reported not interpretable (IND), with no value."""
    payload, patient = fixture_with_new_patient("ecg-sinus.json")
    bundle = json.loads(payload)
    sampled = bundle["entry"][1]["resource"]["component"][0]["valueSampledData"]
    sampled["data"] = " ".join(["0"] * len(sampled["data"].split()))
    flat = json.dumps(bundle).encode()
    response = await _post(stack, flat, R4B)
    assert list(requests_sent(response, flat).values()) == ["ecg-rhythm"]
    report = await tap.wait_for(topics.REPORTS_DIAGNOSTIC, _ecg_report_of(patient))
    assert _band(report) == "unreadable"
    observation = _resources(report)["Observation"]
    assert observation["interpretation"][0]["coding"][0]["code"] == "IND"
    assert "valueQuantity" not in observation
    assert observation["dataAbsentReason"]["coding"][0]["code"] == "error"
    assert "component" not in observation
    conclusion = _resources(report)["DiagnosticReport"]["conclusion"]
    assert conclusion.startswith("ECG not interpretable")
    assert check_report_bundle(report.json()) == []


# Bit 5 of a record batch's attributes: a control batch (a transaction's commit or abort
# marker, written by the broker, never compressed).
_CONTROL_BATCH = 0b10_0000


def _batch_codecs(segment: Path) -> list[int]:
    """The compression codec of every complete data batch (not the transaction markers) in a
    Kafka log segment file."""
    data, position, codecs = segment.read_bytes(), 0, []
    while position + _BATCH_HEADER.size <= len(data):
        _, length, _, _, _, attributes = _BATCH_HEADER.unpack_from(data, position)
        if length <= 0 or position + 12 + length > len(data):
            break
        if not attributes & _CONTROL_BATCH:
            codecs.append(attributes & 0b111)
        position += 12 + length
    return codecs


async def test_tasks_travel_compressed(stack: Stack, tap: TopicTap) -> None:
    """Every batch the router wrote to the ecg-rhythm task topic is lz4-compressed on the broker
    (MEDMESH_KAFKA_COMPRESSION's default; the topic keeps the producer's codec)."""
    payload, patient = fixture_with_new_patient("ecg-sinus.json")
    response = await _post(stack, payload, R4B)
    assert list(requests_sent(response, payload).values()) == ["ecg-rhythm"]
    await tap.wait_for(topics.REPORTS_DIAGNOSTIC, _ecg_report_of(patient))
    logs = stack.config.state_dir / "kafka" / "logs"
    task_topic = topics.model_task_topic("ecg-rhythm", 1)
    segments = sorted(logs.glob(f"{task_topic}-*/*.log"))
    codecs = [c for segment in segments for c in _batch_codecs(segment)]
    assert codecs
    assert set(codecs) == {3}
