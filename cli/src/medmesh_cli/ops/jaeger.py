"""Traces where a deployment keeps them: Jaeger's HTTP query API, read into the waterfall's spans.

A deployment exports spans over OTLP (``MEDMESH_OTLP_TRACES_ENDPOINT`` or the ``OTEL_*``
variables) to a collector and Jaeger; ``medmesh trace`` asks Jaeger's query service
(``MEDMESH_JAEGER_URL``, or ``jaeger`` in a context's endpoints) for the traces whose spans
carry the correlation id, instead of the dev stack's span file. Jaeger's search needs a service:
every ``medmesh-*`` service Jaeger knows is searched (a request's trace starts at ingest, or at
the monolith), by both tags a correlation id travels in.

``spans_from_jaeger`` is pure (Jaeger's JSON to ``waterfall.Span``); ``find_traces`` does the I/O
with a client passed in.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import httpx

from medmesh_cli.ops.waterfall import CONVERSATION_ID, Span

# The span attributes a correlation id is kept in (faststream's conversation id, medmesh's own).
CORRELATION_TAGS = (CONVERSATION_ID, "medmesh.correlation_id")
# How far back and how many traces one search looks.
LOOKBACK = "48h"
SEARCH_LIMIT = 20


def _hex(value: str, width: int) -> str:
    """Jaeger drops leading zeros of a trace id whose high half is zero; W3C ids do not."""
    return value.lower().zfill(width)


def _tags(tags: Iterable[dict[str, Any]]) -> dict[str, Any]:
    return {str(tag["key"]): tag.get("value") for tag in tags}


def spans_from_jaeger(payload: dict[str, Any]) -> list[Span]:
    """The spans of every trace in a Jaeger query API answer (``{"data": [trace, ...]}``)."""
    spans: list[Span] = []
    for trace in payload.get("data") or []:
        processes = trace.get("processes") or {}
        for raw in trace.get("spans") or []:
            tags = _tags(raw.get("tags") or [])
            parent = next(
                (
                    r["spanID"]
                    for r in raw.get("references") or []
                    if r.get("refType") == "CHILD_OF"
                    and _hex(r.get("traceID", ""), 32) == _hex(raw["traceID"], 32)
                ),
                None,
            )
            service = str(processes.get(raw.get("processID"), {}).get("serviceName", ""))
            start_ns = int(raw["startTime"]) * 1000  # Jaeger: microseconds
            spans.append(
                Span(
                    trace_id=_hex(raw["traceID"], 32),
                    span_id=_hex(raw["spanID"], 16),
                    parent_span_id=_hex(parent, 16) if parent else None,
                    name=str(raw.get("operationName", "")),
                    kind=str(tags.pop("span.kind", "")).upper(),
                    service=service.removeprefix("medmesh-"),
                    start_ns=start_ns,
                    end_ns=start_ns + int(raw.get("duration", 0)) * 1000,
                    attributes=tags,
                )
            )
    return spans


def find_traces(client: httpx.Client, base_url: str, correlation_id: str) -> list[Span]:
    """Every span of the traces whose spans carry ``correlation_id``, searched in each medmesh
    service Jaeger knows (one query per service and tag, the traces returned whole)."""
    base = base_url.rstrip("/")
    services = client.get(f"{base}/api/services")
    services.raise_for_status()
    medmesh = sorted(s for s in services.json().get("data") or [] if s.startswith("medmesh-"))
    spans: dict[tuple[str, str], Span] = {}
    for service in medmesh:
        for tag in CORRELATION_TAGS:
            answer = client.get(
                f"{base}/api/traces",
                params={
                    "service": service,
                    "tags": json.dumps({tag: correlation_id}),
                    "lookback": LOOKBACK,
                    "limit": SEARCH_LIMIT,
                },
            )
            answer.raise_for_status()
            for span in spans_from_jaeger(answer.json()):
                spans[(span.trace_id, span.span_id)] = span
    return list(spans.values())
