"""The ops commands against the real stack: dead letters, traces, status."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from typer.testing import CliRunner

from medmesh_cli.devstack.stack import Stack
from medmesh_cli.main import app
from medmesh_cli.ops import kafka_io
from medmesh_cli.ops.connection import as_connection
from medmesh_contracts import headers as h
from medmesh_contracts import topics
from medmesh_contracts.events import FhirEventRejected, Producer, new_id, to_wire
from tests.e2e.answers import requests_sent
from tests.e2e.conftest import fixture_with_new_patient

runner = CliRunner()


def _send(bootstrap: str, topic: str, value: bytes) -> None:
    async def run() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
        await producer.start()
        try:
            await producer.send_and_wait(topic, value)
        finally:
            await producer.stop()

    asyncio.run(run())


def _reports_for(bootstrap: str, patient: str) -> int:
    async def run() -> int:
        async with kafka_io.consumer(as_connection(bootstrap)) as kafka:
            entries = await kafka_io.read_range(kafka, topics.REPORTS_DIAGNOSTIC)
        return sum(f"Patient/{patient}" in e.value.decode() for e in entries)

    return asyncio.run(run())


def _wait(condition: Callable[[], bool], timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.5)
    raise AssertionError(f"condition not met within {timeout_s}s")


def test_dlq_list_show_and_replay_of_an_inbound_event(stack: Stack) -> None:
    """A dead-lettered inbound event is listed, shown without its raw value, and replayed once."""
    bootstrap = stack.config.bootstrap
    payload, patient = fixture_with_new_patient("vitals-bundle-medium.json")
    parked = FhirEventRejected(
        correlation_id=new_id(),
        producer=Producer(service="test", instance="ops"),
        source_topic=topics.FHIR_INBOUND,
        source_partition=0,
        source_offset=0,
        raw_value=payload.decode(),
        raw_encoding="utf-8",
        operation_outcome={
            "resourceType": "OperationOutcome",
            "issue": [
                {
                    "severity": "error",
                    "code": "transient",
                    "diagnostics": f"parked by test {patient}",
                }
            ],
        },
    )
    _send(bootstrap, topics.FHIR_INVALID, to_wire(parked))

    listed = runner.invoke(app, ["dlq", "list", "--bootstrap", bootstrap])
    assert listed.exit_code == 0, listed.output
    assert topics.FHIR_INVALID in listed.output

    shown = runner.invoke(
        app, ["dlq", "show", topics.FHIR_INVALID, "--limit", "1000", "--bootstrap", bootstrap]
    )
    assert shown.exit_code == 0, shown.output
    assert f"parked by test {patient}" in shown.output
    assert patient not in shown.output.replace(f"parked by test {patient}", "")

    ours = next(line for line in shown.output.splitlines() if f"parked by test {patient}" in line)
    position = ours.split()[0]  # PARTITION:OFFSET
    replayed = runner.invoke(app, ["dlq", "replay", topics.FHIR_INVALID, "--bootstrap", bootstrap])
    assert replayed.exit_code == 0, replayed.output
    assert f"replayed {position} -> {topics.FHIR_INBOUND}" in replayed.output
    _wait(lambda: _reports_for(bootstrap, patient) == 1)
    # Entries other tests left that are still broken come back as new dead letters and are
    # replayed again; ours, now fixed, is not replayed a second time.
    again = runner.invoke(app, ["dlq", "replay", topics.FHIR_INVALID, "--bootstrap", bootstrap])
    assert again.exit_code == 0, again.output
    assert f"replayed {position} " not in again.output


def test_trace_command_shows_every_hop_of_a_request(stack: Stack) -> None:
    """`medmesh trace` finds a request by correlation id and shows its four Kafka hops (the id
    the transaction-response names, also in the header)."""
    payload, _ = fixture_with_new_patient("vitals-bundle-low.json")
    response = httpx.post(f"{stack.config.ingest_url}/fhir", content=payload, timeout=30)
    [(correlation_id, model)] = requests_sent(response, payload).items()
    assert model == "deterioration"
    assert response.headers[h.CORRELATION_ID] == correlation_id
    spans = str(stack.config.trace_file)

    hop_topics = (
        topics.INFERENCE_REQUESTS,
        "medmesh.model.deterioration.v1.tasks",
        topics.INFERENCE_RESULTS,
    )

    def traced() -> bool:
        # Each service exports its spans in its own batches: wait until every hop is in.
        out = runner.invoke(app, ["trace", correlation_id, "--spans", spans]).output
        return "medmesh.reports.diagnostic publish" in out and all(
            f"  {topic}: " in out for topic in hop_topics
        )

    _wait(traced, timeout_s=60)
    output = runner.invoke(app, ["trace", correlation_id, "--spans", spans]).output
    for topic in hop_topics:
        assert f"  {topic}: " in output
    assert "time in Kafka" in output


def test_status_shows_consumer_lag_and_dead_letter_sizes(stack: Stack) -> None:
    """`medmesh status` lists medmesh consumer groups with their lag, and dead-letter sizes."""
    result = runner.invoke(app, ["status", "--bootstrap", stack.config.bootstrap])
    assert result.exit_code == 0, result.output
    assert "medmesh-reporting" in result.output
    assert topics.FHIR_INVALID in result.output


def test_group_lags_where_no_group_committed_anything(stack: Stack) -> None:
    """On the real broker, lag of groups that have committed nothing (none match here) is empty,
    not a CancelledError: its consumer is stopped without having made a request, which made
    aiokafka's stop() raise one and `medmesh status` crash on a freshly started stack."""
    connection = as_connection(stack.config.bootstrap)
    lags = asyncio.run(kafka_io.group_lags(connection, prefix=f"medmesh-none-{time.time_ns()}-"))
    assert lags == {}


def test_status_and_dlq_through_a_named_context(
    stack: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A context naming the stack's Kafka and router: `status` checks that router's URL (not the
    loopback defaults) and reads the consumer groups, `dlq list` reads the dead-letter topics."""
    router = f"http://127.0.0.1:{stack.config.ports.router}"
    contexts = tmp_path / "contexts.toml"
    contexts.write_text(
        f'[contexts.e2e]\nbootstrap_servers = "{stack.config.bootstrap}"\n'
        f'security_protocol = "PLAINTEXT"\n[contexts.e2e.endpoints]\nrouter = "{router}"\n'
    )
    monkeypatch.setenv("MEDMESH_CONTEXTS_FILE", str(contexts))
    monkeypatch.delenv("MEDMESH_KAFKA_BOOTSTRAP_SERVERS", raising=False)
    result = runner.invoke(app, ["status", "--context", "e2e"])
    assert result.exit_code == 0, result.output
    router_row = next(
        line for line in result.output.splitlines() if line.strip().startswith("router ")
    )
    assert router in router_row
    assert "yes" in router_row
    assert "ingest" not in result.output.split("consumer group")[0]
    assert "medmesh-reporting" in result.output
    listed = runner.invoke(app, ["dlq", "list", "--context", "e2e"])
    assert listed.exit_code == 0, listed.output
    assert topics.FHIR_INVALID in listed.output


def test_the_stacks_audit_topic_keeps_decisions_for_good(stack: Stack) -> None:
    """The broker's medmesh.models.audit has retention.ms=-1 (created so by create_topics)."""

    async def retention() -> str:
        admin = AIOKafkaAdminClient(bootstrap_servers=stack.config.bootstrap)
        await admin.start()
        try:
            [answer] = await admin.describe_configs(
                [ConfigResource(ConfigResourceType.TOPIC, topics.MODELS_AUDIT)]
            )
        finally:
            await admin.close()
        entries = answer.to_object()["resources"][0]["config_entries"]
        return str(next(e["config_value"] for e in entries if e["config_names"] == "retention.ms"))

    assert asyncio.run(retention()) == "-1"
