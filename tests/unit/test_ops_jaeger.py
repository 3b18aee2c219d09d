"""`medmesh trace` against a deployment's Jaeger: its query API's JSON read into the waterfall."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from medmesh_cli.main import app
from medmesh_cli.ops.jaeger import find_traces, spans_from_jaeger
from medmesh_cli.ops.waterfall import hops, trace_ids_for

CORRELATION = "3f2c0d1e-8a7b-4c6d-9e0f-1a2b3c4d5e6f"
TRACE = "00000000000000004bf92f3577b34da6"  # high half zero: Jaeger drops the leading zeros


def _span(
    span_id: str, name: str, process: str, start_us: int, duration_us: int, **extra: Any
) -> dict[str, Any]:
    tags = [{"key": k, "type": "string", "value": v} for k, v in extra.pop("tags", {}).items()]
    return {
        "traceID": TRACE.lstrip("0"),
        "spanID": span_id,
        "operationName": name,
        "references": extra.pop("references", []),
        "startTime": start_us,
        "duration": duration_us,
        "tags": tags,
        "logs": [],
        "processID": process,
        "warnings": None,
    }


def _jaeger_answer() -> dict[str, Any]:
    """A Jaeger query API answer with one trace: ingest publishes the request, the router
    processes it (a child of the publish), as the OTLP spans of medmesh reach Jaeger."""
    publish = _span(
        "00f067aa0ba902b7",
        "medmesh.inference.requests publish",
        "p1",
        1_700_000_000_000_000,
        2_000,
        tags={"span.kind": "producer", "messaging.message.conversation_id": CORRELATION},
    )
    process = _span(
        "0a1b2c3d4e5f6071",
        "medmesh.inference.requests process",
        "p2",
        1_700_000_000_005_000,
        1_500,
        tags={"span.kind": "consumer", "messaging.message.conversation_id": CORRELATION},
        references=[
            {"refType": "CHILD_OF", "traceID": TRACE.lstrip("0"), "spanID": "00f067aa0ba902b7"}
        ],
    )
    return {
        "data": [
            {
                "traceID": TRACE.lstrip("0"),
                "spans": [publish, process],
                "processes": {
                    "p1": {"serviceName": "medmesh-ingest", "tags": []},
                    "p2": {"serviceName": "medmesh-router", "tags": []},
                },
            }
        ]
    }


def route_http_clients(monkeypatch: pytest.MonkeyPatch, transport: httpx.BaseTransport) -> None:
    """Every httpx.Client the CLI makes from now on sends through ``transport``."""
    real_client = httpx.Client

    def client(**kwargs: Any) -> httpx.Client:
        return real_client(transport=transport, **kwargs)

    monkeypatch.setattr(httpx, "Client", client)


def test_jaeger_json_becomes_the_waterfalls_spans_and_hops() -> None:
    """Ids padded to W3C width, microseconds to nanoseconds, the CHILD_OF parent, the span
    kind and service; the hop's Kafka wait is the publish start to the process start."""
    spans = spans_from_jaeger(_jaeger_answer())
    assert trace_ids_for(spans, CORRELATION) == [TRACE]
    process = next(s for s in spans if s.name.endswith("process"))
    assert process.parent_span_id == "00f067aa0ba902b7"
    assert (process.kind, process.service) == ("CONSUMER", "router")
    assert process.duration_ms == pytest.approx(1.5)
    [hop] = hops(spans)
    assert (hop.producer, hop.consumer) == ("ingest", "router")
    assert hop.wait_ms == pytest.approx(5.0)


def _jaeger_server(seen: list[httpx.Request]) -> httpx.MockTransport:
    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.path == "/api/services":
            return httpx.Response(200, json={"data": ["jaeger-all-in-one", "medmesh-ingest"]})
        tags = json.loads(request.url.params["tags"])
        found = tags.get("messaging.message.conversation_id") == CORRELATION
        return httpx.Response(200, json=_jaeger_answer() if found else {"data": []})

    return httpx.MockTransport(answer)


def test_every_medmesh_service_is_searched_by_both_correlation_tags() -> None:
    """Only medmesh-* services are searched, each by both tags a correlation id is kept in;
    a span found twice is kept once."""
    seen: list[httpx.Request] = []
    with httpx.Client(transport=_jaeger_server(seen)) as client:
        spans = find_traces(client, "http://jaeger:16686/", CORRELATION)
    searches = [r for r in seen if r.url.path == "/api/traces"]
    assert {r.url.params["service"] for r in searches} == {"medmesh-ingest"}
    assert {next(iter(json.loads(r.url.params["tags"]))) for r in searches} == {
        "messaging.message.conversation_id",
        "medmesh.correlation_id",
    }
    assert len(spans) == 2


def test_the_trace_command_reads_jaeger_when_it_is_configured(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """With MEDMESH_JAEGER_URL set, `medmesh trace` prints the waterfall from Jaeger (no span
    file needed)."""
    seen: list[httpx.Request] = []
    transport = _jaeger_server(seen)
    route_http_clients(monkeypatch, transport)
    monkeypatch.setenv("MEDMESH_JAEGER_URL", "http://jaeger:16686")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    result = CliRunner().invoke(app, ["trace", CORRELATION])
    assert result.exit_code == 0, result.output
    assert f"trace {TRACE}" in result.output
    assert "medmesh.inference.requests: ingest -> router" in result.output
    assert seen
