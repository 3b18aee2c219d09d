"""`medmesh trace` against a deployment's Grafana Tempo: its search and trace-by-id answers, in
the shapes Tempo's API documentation shows, read into the waterfall."""

from __future__ import annotations

import base64
import copy
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from medmesh_cli.main import app
from medmesh_cli.ops import commands
from medmesh_cli.ops.connection import resolve
from medmesh_cli.ops.tempo import LOOKBACK_S, find_traces, spans_from_otlp, traceql
from medmesh_cli.ops.waterfall import hops, trace_ids_for
from tests.unit.test_ops_jaeger import route_http_clients

CORRELATION = "3f2c0d1e-8a7b-4c6d-9e0f-1a2b3c4d5e6f"
TRACE = "00000000000000004bf92f3577b34da6"  # high half zero: the search drops the leading zeros
PUBLISH, PROCESS = "00f067aa0ba902b7", "0a1b2c3d4e5f6071"
START_NS = 1_700_000_000_000_000_000
NOW_S = START_NS // 1_000_000_000 + 60


def _b64(hex_id: str) -> str:
    """An id as Tempo's JSON writes it (protobuf's JSON mapping of bytes: base64)."""
    return base64.b64encode(bytes.fromhex(hex_id)).decode()


def _string(key: str, value: str) -> dict[str, Any]:
    return {"key": key, "value": {"stringValue": value}}


def _span(
    span_id: str, parent: str, name: str, kind: str, start_ns: int, ms: float
) -> dict[str, Any]:
    """One span as in Tempo's documented trace-by-id answer (base64 ids, kind by name)."""
    return {
        "traceId": _b64(TRACE),
        "spanId": _b64(span_id),
        "parentSpanId": _b64(parent) if parent else "",
        "name": name,
        "kind": kind,
        "startTimeUnixNano": str(start_ns),
        "endTimeUnixNano": str(start_ns + int(ms * 1_000_000)),
        "attributes": [
            _string("messaging.message.conversation_id", CORRELATION),
            {"key": "messaging.kafka.message.offset", "value": {"intValue": "42"}},
        ],
        "status": {},
    }


def _resource(service: str, span: dict[str, Any]) -> dict[str, Any]:
    return {
        "resource": {"attributes": [_string("service.name", service)]},
        "scopeSpans": [{"scope": {"name": "faststream", "version": "0.5"}, "spans": [span]}],
    }


def _tempo_trace() -> dict[str, Any]:
    """GET /api/traces/<id>: ingest publishes the request, the router processes it (a child of
    the publish), each service its own resource, under Tempo's v1 key ``batches``."""
    return {
        "batches": [
            _resource(
                "medmesh-ingest",
                _span(
                    PUBLISH,
                    "",
                    "medmesh.inference.requests publish",
                    "SPAN_KIND_PRODUCER",
                    START_NS,
                    2,
                ),
            ),
            _resource(
                "medmesh-router",
                _span(
                    PROCESS,
                    PUBLISH,
                    "medmesh.inference.requests process",
                    "SPAN_KIND_CONSUMER",
                    START_NS + 5_000_000,
                    1.5,
                ),
            ),
        ]
    }


def _search_answer(trace_id: str) -> dict[str, Any]:
    """GET /api/search with a TraceQL query: the documented answer's fields."""
    span_set = {
        "spans": [
            {
                "spanID": PROCESS,
                "startTimeUnixNano": str(START_NS + 5_000_000),
                "durationNanos": "1500000",
                "attributes": [_string("messaging.message.conversation_id", CORRELATION)],
            }
        ],
        "matched": 1,
    }
    return {
        "traces": [
            {
                "traceID": trace_id,
                "rootServiceName": "medmesh-ingest",
                "rootTraceName": "medmesh.inference.requests publish",
                "startTimeUnixNano": str(START_NS),
                "durationMs": 7,
                "spanSet": span_set,
                "spanSets": [span_set],
            }
        ],
        "metrics": {"inspectedBytes": "292781", "completedJobs": 1, "totalJobs": 1},
    }


def test_tempo_trace_json_becomes_the_waterfalls_spans_and_hops() -> None:
    """Base64 ids to hex, the parent span, the kind's name, the resource's service; the hop's
    Kafka wait is the publish start to the process start."""
    spans = spans_from_otlp(_tempo_trace())
    assert trace_ids_for(spans, CORRELATION) == [TRACE]
    process = next(s for s in spans if s.name.endswith("process"))
    assert (process.trace_id, process.span_id, process.parent_span_id) == (TRACE, PROCESS, PUBLISH)
    assert (process.kind, process.service) == ("CONSUMER", "router")
    assert process.attributes["messaging.kafka.message.offset"] == 42
    assert process.duration_ms == pytest.approx(1.5)
    publish = next(s for s in spans if s.name.endswith("publish"))
    assert publish.parent_span_id is None
    [hop] = hops(spans)
    assert (hop.producer, hop.consumer) == ("ingest", "router")
    assert hop.wait_ms == pytest.approx(5.0)


def test_hex_ids_numeric_kinds_and_the_v2_envelope_read_the_same() -> None:
    """OTLP/JSON's own shape (hex ids, kinds as numbers, ``resourceSpans``, times as numbers)
    inside Tempo v2's ``{"trace": ...}`` reads into the same spans as Tempo's v1 answer."""
    otlp = copy.deepcopy(_tempo_trace())
    numbers = {"SPAN_KIND_PRODUCER": 4, "SPAN_KIND_CONSUMER": 5}
    for resource in otlp["batches"]:
        for span in resource["scopeSpans"][0]["spans"]:
            for key in ("traceId", "spanId", "parentSpanId"):
                span[key] = base64.b64decode(span[key]).hex().upper()
            span["kind"] = numbers[span["kind"]]
            span["startTimeUnixNano"] = int(span["startTimeUnixNano"])
    v2 = {"trace": {"resourceSpans": otlp.pop("batches")}}
    assert spans_from_otlp(v2) == spans_from_otlp(_tempo_trace())


def test_an_id_neither_hex_nor_base64_of_its_size_is_refused() -> None:
    """A span id that is not 8 bytes (hex or base64) raises ValueError, not a wrong waterfall."""
    bad = _tempo_trace()
    bad["batches"][0]["scopeSpans"][0]["spans"][0]["spanId"] = _b64("00f067aa0ba902")
    with pytest.raises(ValueError, match="7 bytes, not 8"):
        spans_from_otlp(bad)
    bad["batches"][0]["scopeSpans"][0]["spans"][0]["spanId"] = "not an id!"
    with pytest.raises(ValueError, match="not a hex or base64 id"):
        spans_from_otlp(bad)


def test_traceql_quotes_the_value() -> None:
    """The correlation id is a TraceQL string literal: quotes and backslashes escaped."""
    assert traceql("medmesh.correlation_id", 'a"b\\c') == (
        '{ span.medmesh.correlation_id = "a\\"b\\\\c" }'
    )


def _tempo_server(seen: list[httpx.Request]) -> httpx.MockTransport:
    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.path == "/api/search":
            found = request.url.params["q"] == traceql(
                "messaging.message.conversation_id", CORRELATION
            ) or request.url.params["q"] == traceql("medmesh.correlation_id", CORRELATION)
            return httpx.Response(
                200, json=_search_answer(TRACE.lstrip("0")) if found else {"traces": []}
            )
        if request.url.path == f"/api/traces/{TRACE}":
            return httpx.Response(200, json=_tempo_trace())
        return httpx.Response(404, text="trace not found")

    return httpx.MockTransport(answer)


def test_both_correlation_tags_are_searched_and_each_trace_fetched_once() -> None:
    """One TraceQL search per correlation tag over the lookback window; a trace both find is
    fetched once, by its 32-digit id, and its spans kept once."""
    seen: list[httpx.Request] = []
    with httpx.Client(transport=_tempo_server(seen)) as client:
        spans = find_traces(client, "http://tempo:3200/", CORRELATION, now_s=NOW_S)
    searches = [r for r in seen if r.url.path == "/api/search"]
    assert [r.url.params["q"] for r in searches] == [
        f'{{ span.messaging.message.conversation_id = "{CORRELATION}" }}',
        f'{{ span.medmesh.correlation_id = "{CORRELATION}" }}',
    ]
    assert {(r.url.params["start"], r.url.params["end"]) for r in searches} == {
        (str(NOW_S - LOOKBACK_S), str(NOW_S))
    }
    assert [r.url.path for r in seen if r.url.path.startswith("/api/traces/")] == [
        f"/api/traces/{TRACE}"
    ]
    assert len(spans) == 2


def test_the_trace_command_reads_tempo_first_when_it_is_configured(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """With MEDMESH_TEMPO_URL set (Jaeger's too), `medmesh trace` prints the waterfall from
    Tempo and asks Jaeger nothing."""
    seen: list[httpx.Request] = []
    transport = _tempo_server(seen)
    route_http_clients(monkeypatch, transport)
    monkeypatch.setenv("MEDMESH_TEMPO_URL", "http://tempo:3200")
    monkeypatch.setenv("MEDMESH_JAEGER_URL", "http://jaeger:16686")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    result = CliRunner().invoke(app, ["trace", CORRELATION])
    assert result.exit_code == 0, result.output
    assert f"trace {TRACE}" in result.output
    assert "medmesh.inference.requests: ingest -> router" in result.output
    assert {r.url.host for r in seen} == {"tempo"}


def test_a_tempo_that_fails_ends_the_command_in_one_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A Tempo answering 500 ends `medmesh trace` with exit 1 naming Tempo, no traceback."""
    route_http_clients(monkeypatch, httpx.MockTransport(lambda _: httpx.Response(500, text="boom")))
    monkeypatch.setenv("MEDMESH_TEMPO_URL", "http://tempo:3200")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    result = CliRunner().invoke(app, ["trace", CORRELATION])
    assert result.exit_code == 1, result.output
    assert "Tempo at http://tempo:3200 did not answer" in result.output
    assert isinstance(result.exception, SystemExit)


def test_a_contexts_tempo_endpoint_is_a_trace_store_not_a_service(tmp_path: Path) -> None:
    """`tempo` in a context's endpoints is where `trace` reads; `status` does not probe it."""
    contexts = tmp_path / "contexts.toml"
    contexts.write_text(
        '[contexts.d.endpoints]\nrouter = "http://router:8181"\ntempo = "http://tempo:3200/"\n'
    )
    connection = resolve("d", environ={"MEDMESH_CONTEXTS_FILE": str(contexts)})
    assert connection.endpoints["tempo"] == "http://tempo:3200"
    assert commands.service_endpoints(connection) == {"router": "http://router:8181"}


def test_a_tempo_answer_of_another_shape_ends_the_command_in_one_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A search answer whose trace has no traceID (JSON, but not Tempo's shape): exit 1 with
    one line naming Tempo and the missing field, no traceback."""
    route_http_clients(
        monkeypatch, httpx.MockTransport(lambda _: httpx.Response(200, json={"traces": [{}]}))
    )
    monkeypatch.setenv("MEDMESH_TEMPO_URL", "http://tempo:3200")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    result = CliRunner().invoke(app, ["trace", CORRELATION])
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "not its trace API's JSON" in result.output
    assert "traceID" in result.output
