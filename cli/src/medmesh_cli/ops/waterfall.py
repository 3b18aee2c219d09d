"""A trace as a terminal waterfall: pure functions over span records (the JSON-lines file).

Per hop it separates work (a service's process span) from time in Kafka (from the start of the
upstream publish, which includes the acks=all round trip, to the start of the downstream process
span), the figure the seeds' "a network hop costs 5-20 ms" debate is about. Measuring from the
publish's end would go negative: a consumer can fetch a record before its producer has read the
acknowledgement.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONVERSATION_ID = "messaging.message.conversation_id"


@dataclass(frozen=True)
class Span:
    """The fields of one span the waterfall needs."""

    trace_id: str
    span_id: str
    parent_span_id: str | None
    name: str
    kind: str
    service: str
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]

    @property
    def duration_ms(self) -> float:
        """How long the span lasted."""
        return (self.end_ns - self.start_ns) / 1e6


@dataclass(frozen=True)
class Hop:
    """One Kafka hop: the publish upstream and the process span downstream."""

    topic: str
    producer: str
    consumer: str
    wait_ms: float
    work_ms: float


def read_spans(path: Path) -> list[Span]:
    """Every span in a JSON-lines span file (as written by medmesh_runtime.telemetry)."""
    return parse_spans(path.read_text().splitlines())


def parse_spans(lines: Iterable[str]) -> list[Span]:
    """The spans of JSON lines (blank lines skipped)."""
    spans = []
    for line in lines:
        if not line.strip():
            continue
        record = json.loads(line)
        spans.append(
            Span(
                trace_id=record["trace_id"],
                span_id=record["span_id"],
                parent_span_id=record.get("parent_span_id"),
                name=record["name"],
                kind=record.get("kind", ""),
                service=str(record.get("service") or "").removeprefix("medmesh-"),
                start_ns=int(record["start_ns"]),
                end_ns=int(record["end_ns"]),
                attributes=record.get("attributes", {}),
            )
        )
    return spans


def trace_ids_for(spans: Iterable[Span], correlation_id: str) -> list[str]:
    """Trace ids whose spans carry this correlation id (faststream's conversation id)."""
    found: list[str] = []
    for span in spans:
        if (
            correlation_id
            in (
                span.attributes.get(CONVERSATION_ID),
                span.attributes.get("medmesh.correlation_id"),
            )
            and span.trace_id not in found
        ):
            found.append(span.trace_id)
    return found


def spans_of(spans: Iterable[Span], trace_id: str) -> list[Span]:
    """The spans of one trace, in start order."""
    return sorted((s for s in spans if s.trace_id == trace_id), key=lambda s: s.start_ns)


def hops(trace: Sequence[Span]) -> list[Hop]:
    """Kafka hops of a trace: each '<topic> process' span matched to its '<topic> publish', or,
    when its record carries the upstream stage's own process span's context (the inference
    worker's results: no publish span), to that span, waiting from its end."""
    result = []
    publishes = {s.name.removesuffix(" publish"): s for s in trace if s.name.endswith(" publish")}
    by_id = {span.span_id: span for span in trace}
    for span in trace:
        if not span.name.endswith(" process"):
            continue
        topic = span.name.removesuffix(" process")
        published = publishes.get(topic)
        if published is not None:
            producer, produced_ns = published.service, published.start_ns
        else:
            parent = by_id.get(span.parent_span_id or "")
            if parent is None or parent.service == span.service:
                continue
            if not parent.name.endswith(" process"):
                continue
            producer, produced_ns = parent.service, parent.end_ns
        result.append(
            Hop(
                topic=topic,
                producer=producer,
                consumer=span.service,
                wait_ms=(span.start_ns - produced_ns) / 1e6,
                work_ms=span.duration_ms,
            )
        )
    return result


def render(trace: Sequence[Span], width: int = 40) -> list[str]:
    """Waterfall lines: offset, duration, a bar, service and span name."""
    if not trace:
        return []
    start = min(s.start_ns for s in trace)
    end = max(s.end_ns for s in trace)
    total = max(end - start, 1)
    lines = []
    for span in trace:
        left = int((span.start_ns - start) / total * width)
        length = max(1, int((span.end_ns - span.start_ns) / total * width))
        bar = " " * left + "█" * min(length, width - left)
        offset_ms = (span.start_ns - start) / 1e6
        lines.append(
            f"{offset_ms:8.1f} ms {span.duration_ms:8.1f} ms |{bar:<{width}}| "
            f"{span.service:<28} {span.name}"
        )
    return lines
