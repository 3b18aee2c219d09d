"""Traces where a deployment keeps them in Grafana Tempo: its HTTP API, read into the waterfall.

``medmesh trace`` asks Tempo (``MEDMESH_TEMPO_URL``, or ``tempo`` in a context's endpoints) for
the traces whose spans carry the correlation id: a TraceQL search per tag a correlation id
travels in (``GET /api/search?q={ span.<tag> = "<id>" }``), then each trace found, whole
(``GET /api/traces/<trace id>``).

A trace comes back as OpenTelemetry's trace JSON, in the shapes Tempo versions answer with:
``{"batches": [...]}`` (the v1 path, kept by Tempo for compatibility), ``{"resourceSpans": [...]}``
(OTLP's own), or either inside ``{"trace": ...}`` (Tempo's v2 path); spans under ``scopeSpans``
(``instrumentationLibrarySpans``, OTLP's older name, in Tempo 1.x). Its ids are base64 (protobuf's
JSON mapping of bytes, what Tempo writes) or hex (OTLP/JSON's rule); a span's kind is an enum
name (``SPAN_KIND_SERVER``) or number.

``spans_from_otlp`` is pure (that JSON to ``waterfall.Span``); ``find_traces`` does the I/O with a
client passed in.
"""

from __future__ import annotations

import base64
import binascii
import string
import time
from collections.abc import Callable, Iterable
from typing import Any

import httpx

from medmesh_cli.ops.jaeger import CORRELATION_TAGS, SEARCH_LIMIT
from medmesh_cli.ops.waterfall import Span

# How far back one search looks (as Jaeger's LOOKBACK): with start and end, Tempo searches its
# backend blocks too, not only the recent data of its live stores.
LOOKBACK_S = 48 * 3600
# OTLP's SpanKind numbers (OTLP/JSON writes enums as numbers; Tempo writes their names).
_KINDS = {1: "INTERNAL", 2: "SERVER", 3: "CLIENT", 4: "PRODUCER", 5: "CONSUMER"}
# OTLP's scalar AnyValue fields and how each reads.
_SCALARS: dict[str, Callable[[Any], Any]] = {
    "stringValue": str,
    "intValue": int,
    "doubleValue": float,
    "boolValue": bool,
    "bytesValue": str,
}


def traceql(tag: str, value: str) -> str:
    """The TraceQL spanset filter for spans whose attribute ``tag`` equals ``value``."""
    quoted = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'{{ span.{tag} = "{quoted}" }}'


def _id(value: Any, size: int) -> str | None:
    """An id of ``size`` bytes as lower-case hex, from hex or base64 (empty: none)."""
    if not value:
        return None
    text = str(value)
    if len(text) == 2 * size and all(c in string.hexdigits for c in text):
        return text.lower()
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"not a hex or base64 id: {text!r}") from exc
    if len(raw) != size:
        raise ValueError(f"id {text!r} is {len(raw)} bytes, not {size}")
    return raw.hex()


def _value(value: dict[str, Any]) -> Any:
    """An OTLP AnyValue as a plain value (int64 comes as a JSON string; bytes stay base64)."""
    for key, convert in _SCALARS.items():
        if key in value:
            return convert(value[key])
    if "arrayValue" in value:
        return [_value(v) for v in value["arrayValue"].get("values") or []]
    if "kvlistValue" in value:
        return _attributes(value["kvlistValue"].get("values") or [])
    return None


def _attributes(pairs: Iterable[dict[str, Any]]) -> dict[str, Any]:
    return {str(pair["key"]): _value(pair.get("value") or {}) for pair in pairs}


def _kind(value: Any) -> str:
    if isinstance(value, int):
        return _KINDS.get(value, "")
    name = str(value or "").removeprefix("SPAN_KIND_")
    return "" if name == "UNSPECIFIED" else name


def spans_from_otlp(payload: dict[str, Any]) -> list[Span]:
    """The spans of one trace as Tempo's trace-by-id API answers it."""
    trace = payload.get("trace", payload)
    spans: list[Span] = []
    for resource_spans in trace.get("resourceSpans") or trace.get("batches") or []:
        resource = _attributes((resource_spans.get("resource") or {}).get("attributes") or [])
        service = str(resource.get("service.name", "")).removeprefix("medmesh-")
        scopes = (
            resource_spans.get("scopeSpans")
            or resource_spans.get("instrumentationLibrarySpans")
            or []
        )
        for scope in scopes:
            for raw in scope.get("spans") or []:
                trace_id, span_id = _id(raw.get("traceId"), 16), _id(raw.get("spanId"), 8)
                if trace_id is None or span_id is None:
                    raise ValueError(f"a span without trace or span id: {raw.get('name')!r}")
                spans.append(
                    Span(
                        trace_id=trace_id,
                        span_id=span_id,
                        parent_span_id=_id(raw.get("parentSpanId"), 8),
                        name=str(raw.get("name", "")),
                        kind=_kind(raw.get("kind")),
                        service=service,
                        start_ns=int(raw["startTimeUnixNano"]),
                        end_ns=int(raw["endTimeUnixNano"]),
                        attributes=_attributes(raw.get("attributes") or []),
                    )
                )
    return spans


def find_traces(
    client: httpx.Client, base_url: str, correlation_id: str, now_s: float | None = None
) -> list[Span]:
    """Every span of the traces whose spans carry ``correlation_id`` (one TraceQL search per
    correlation tag over the last ``LOOKBACK_S``, then each trace found, whole)."""
    base = base_url.rstrip("/")
    end = int(time.time() if now_s is None else now_s)
    trace_ids: set[str] = set()
    for tag in CORRELATION_TAGS:
        answer = client.get(
            f"{base}/api/search",
            params={
                "q": traceql(tag, correlation_id),
                "limit": SEARCH_LIMIT,
                "start": end - LOOKBACK_S,
                "end": end,
            },
        )
        answer.raise_for_status()
        for found in answer.json().get("traces") or []:
            # The search drops a trace id's leading zeros; the waterfall uses W3C's 32 digits.
            trace_ids.add(str(found["traceID"]).lower().zfill(32))
    spans: dict[tuple[str, str], Span] = {}
    for trace_id in sorted(trace_ids):
        answer = client.get(f"{base}/api/traces/{trace_id}")
        answer.raise_for_status()
        for span in spans_from_otlp(answer.json()):
            spans[(span.trace_id, span.span_id)] = span
    return list(spans.values())
