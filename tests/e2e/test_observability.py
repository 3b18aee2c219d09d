"""Observability on the real stack: one trace per request, no patient data in logs, metrics."""

from __future__ import annotations

import asyncio
import json
import re
import secrets
from pathlib import Path
from typing import Any

import httpx
from aiokafka import AIOKafkaProducer

from medmesh_cli.devstack.stack import Stack, service_specs
from medmesh_contracts import headers as h
from medmesh_contracts import topics
from tests.e2e.conftest import Record, TopicTap, fixture_with_new_patient
from tests.modules import load_file

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = load_file(
    ROOT / "deploy" / "observability" / "dashboards.py", "observability_dashboards"
)


def _patient_data(bundle: dict[str, Any]) -> list[str]:
    patient = next(
        e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Patient"
    )
    values = [patient["birthDate"]]
    values += [i["value"] for i in patient.get("identifier", [])]
    values += [n["family"] for n in patient.get("name", [])]
    values += [g for n in patient.get("name", []) for g in n.get("given", [])]
    values += [t["value"] for t in patient.get("telecom", [])]
    values += [line for a in patient.get("address", []) for line in a.get("line", [])]
    return values


def _service_logs(state_dir: Path) -> dict[str, str]:
    return {p.name: p.read_text(errors="replace") for p in state_dir.glob("*.log")}


def _with_bytes(text: bytes) -> Any:
    def matches(record: Record) -> bool:
        return text in record.value

    return matches


def _for_correlation(correlation_id: str) -> Any:
    def matches(record: Record) -> bool:
        return record.headers.get(h.CORRELATION_ID) == correlation_id

    return matches


async def test_logs_of_every_service_carry_no_patient_data(stack: Stack, tap: TopicTap) -> None:
    """After a Bundle full of personal data went through all services, no log line holds any."""
    payload, _ = fixture_with_new_patient("vitals-bundle-high.json")  # fresh: ingest dedupes
    secrets = _patient_data(json.loads(payload))
    assert len(secrets) >= 6
    async with httpx.AsyncClient(base_url=stack.config.ingest_url, timeout=30) as client:
        response = await client.post("/fhir", content=payload)
    assert response.status_code == 202
    await tap.wait_for(
        topics.REPORTS_DIAGNOSTIC, _for_correlation(response.headers[h.CORRELATION_ID])
    )
    logs = _service_logs(Path(stack.config.state_dir))
    assert {"ingest.log", "router.log", "reporting.log"} <= set(logs)
    for name, text in logs.items():
        if name == "triton.log":
            continue  # Triton never sees FHIR: only the numeric input tensor
        for secret in secrets:
            assert secret not in text, f"{name} contains patient data"
        for line in text.splitlines():
            if line.startswith("{"):
                record = json.loads(line)
                assert "service" in record


async def test_one_trace_id_across_all_four_services(stack: Stack, tap: TopicTap) -> None:
    """Every service's spans for one request share the trace id ingest answered with."""
    payload, _ = fixture_with_new_patient("vitals-bundle-medium.json")
    async with httpx.AsyncClient(base_url=stack.config.ingest_url, timeout=30) as client:
        response = await client.post("/fhir", content=payload)
    correlation_id = response.headers[h.CORRELATION_ID]
    trace_id = response.headers["medmesh-trace-id"]
    await tap.wait_for(topics.REPORTS_DIAGNOSTIC, _for_correlation(correlation_id))
    stack_spans = Path(stack.config.trace_file)

    def services_in_trace() -> set[str]:
        if not stack_spans.exists():
            return set()
        spans = [json.loads(line) for line in stack_spans.read_text().splitlines() if line]
        return {s["service"] for s in spans if s["trace_id"] == trace_id}

    def complete() -> bool:
        found = services_in_trace()
        return expected <= found and any(s.startswith("medmesh-inference") for s in found)

    expected = {"medmesh-ingest", "medmesh-router", "medmesh-reporting"}
    for _ in range(60):  # spans are exported in batches every few seconds
        if complete():
            break
        await asyncio.sleep(0.5)
    found = services_in_trace()
    assert expected <= found
    assert any(s.startswith("medmesh-inference") for s in found)
    _assert_trace_structure(stack_spans, trace_id)


def _assert_trace_structure(span_file: Path, trace_id: str) -> None:
    """One root (ingest's HTTP span); validation, routing and report building have spans; every
    other span's parent is in the trace; the worker's per-request span links to its batch span."""
    every = [json.loads(line) for line in span_file.read_text().splitlines() if line]
    trace = [s for s in every if s["trace_id"] == trace_id]
    ids = {s["span_id"] for s in trace}
    roots = [s for s in trace if s["parent_span_id"] not in ids]
    assert [r["name"] for r in roots] == ["POST /fhir"]
    assert roots[0]["service"] == "medmesh-ingest"
    names = {s["name"] for s in trace}
    for step in ("ingest.handle", "router.route", "reporting.build-report"):
        assert step in names, step
    worker_spans = [s for s in trace if s["name"].endswith(".tasks process")]
    assert worker_spans
    batch_ids = {s["span_id"] for s in every if s["name"] == "inference.batch"}
    for span in worker_spans:
        assert any(link["span_id"] in batch_ids for link in span["links"])


async def test_metrics_endpoint_counts_the_messages_a_service_processed(stack: Stack) -> None:
    """The router's /metrics exposes per-topic message counts from the telemetry middleware
    (its followers are faststream subscribers: the workers' heartbeats arrive every few
    seconds)."""
    port = stack.config.ports.router
    text = ""
    async with httpx.AsyncClient(timeout=10) as client:
        for _ in range(30):
            text = (await client.get(f"http://127.0.0.1:{port}/metrics")).text
            if "messaging_process_messages_message_total" in text:
                break
            await asyncio.sleep(0.5)
    counted = [line for line in text.splitlines() if line.startswith("messaging_process_messages")]
    assert any(topics.MODELS_STATUS in line for line in counted)


async def test_worker_metrics_show_per_version_requests_and_consumer_lag(
    stack: Stack, tap: TopicTap
) -> None:
    """A worker's /metrics has per-version request counts and its group's lag per partition;
    the router's has the request's task, the weights and the rollout step."""
    payload, _ = fixture_with_new_patient("vitals-bundle-low.json")
    async with httpx.AsyncClient(base_url=stack.config.ingest_url, timeout=30) as client:
        response = await client.post("/fhir", content=payload)
    await tap.wait_for(
        topics.REPORTS_DIAGNOSTIC, _for_correlation(response.headers[h.CORRELATION_ID])
    )
    port = next(s.port for s in service_specs(stack.config) if s.name == "deterioration-v1")
    worker = f"http://127.0.0.1:{port}/metrics"
    text = ""
    async with httpx.AsyncClient(timeout=10) as client:
        for _ in range(30):  # lag is sampled every 5 s
            text = (await client.get(worker)).text
            if "medmesh_consumer_lag" in text:
                break
            await asyncio.sleep(0.5)
    assert 'medmesh_inference_requests_total{model="deterioration",model_version="1"' in text
    assert "medmesh_inference_triton_duration_seconds_bucket" in text
    assert 'consumer_group="medmesh-worker-deterioration-v1"' in text
    # The router that routed it counts tasks per version and reason, and shows the weights.
    router = f"http://127.0.0.1:{stack.config.ports.router}/metrics"
    async with httpx.AsyncClient(timeout=10) as client:
        text = (await client.get(router)).text
    assert 'medmesh_router_tasks_total{model="deterioration",model_version="1"' in text
    assert 'medmesh_router_weight_percent{model="deterioration"' in text
    assert 'medmesh_router_rollout_step{model="deterioration"' in text


async def test_each_inbound_event_of_a_poll_keeps_its_own_trace(
    stack: Stack, tap: TopicTap, producer: AIOKafkaProducer
) -> None:
    """Events that arrive on medmesh.fhir.inbound together (one poll) each carry their own
    trace: the RequestInference of every event continues the trace in that event's headers."""
    sent: dict[str, str] = {}  # patient id -> trace id of the event
    partition = min(await producer.partitions_for(topics.FHIR_INBOUND))
    acknowledgements = []
    for _ in range(5):  # sent together to one partition: ingest reads them in one poll
        payload, patient = fixture_with_new_patient("vitals-bundle-high.json")
        trace_id = secrets.token_hex(16)
        sent[patient] = trace_id
        traceparent = f"00-{trace_id}-{secrets.token_hex(8)}-01".encode()
        acknowledgements.append(
            await producer.send(
                topics.FHIR_INBOUND,
                payload,
                partition=partition,
                headers=[("traceparent", traceparent)],
            )
        )
    await asyncio.gather(*acknowledgements)
    for patient, trace_id in sent.items():
        subject = f'"Patient/{patient}"'.encode()
        record = await tap.wait_for(topics.INFERENCE_REQUESTS, _with_bytes(subject))
        assert record.headers["traceparent"].split("-")[1] == trace_id, patient


# Exported only while a rollout is being judged; tests/unit/test_router_metrics.py checks that
# the router exports it under this name.
ONLY_DURING_A_ROLLOUT = {"medmesh_router_rollout_evaluations_total"}
_QUERIED = re.compile(r"\b(?:medmesh|messaging|nv)_[a-z0-9_]+")
# "by (label, ...)": label names, not metrics.
_GROUPING = re.compile(r"\bby \([^)]*\)")


async def test_every_metric_the_dashboards_and_alerts_query_is_exported(
    stack: Stack, tap: TopicTap, producer: AIOKafkaProducer
) -> None:
    """Each metric that a Grafana dashboard or an alert rule queries is exported by a service of
    the running stack or by Triton, once a request went through and the router dead-lettered
    one undecodable record."""
    payload, _ = fixture_with_new_patient("vitals-bundle-low.json")
    async with httpx.AsyncClient(base_url=stack.config.ingest_url, timeout=30) as client:
        response = await client.post("/fhir", content=payload)
    await tap.wait_for(
        topics.REPORTS_DIAGNOSTIC, _for_correlation(response.headers[h.CORRELATION_ID])
    )
    await producer.send_and_wait(topics.INFERENCE_REQUESTS, b"{not a request", key=b"poison")
    queried = {
        name
        for query in DASHBOARDS.queries()
        for name in _QUERIED.findall(_GROUPING.sub("", query))
    } - ONLY_DURING_A_ROLLOUT
    ports = [s.port for s in service_specs(stack.config)] + [stack.config.ports.triton_metrics]
    exported: set[str] = set()
    async with httpx.AsyncClient(timeout=10) as client:
        for _ in range(40):  # lag is sampled every 5 s; the dead letter takes a poll
            exported = set()
            for port in ports:
                text = (await client.get(f"http://127.0.0.1:{port}/metrics")).text
                exported |= {line.split("{")[0].split(" ")[0] for line in text.splitlines()}
            if queried <= exported:
                break
            await asyncio.sleep(0.5)
    assert sorted(queried - exported) == []
