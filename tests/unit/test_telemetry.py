"""Tracing helpers of medmesh_runtime.telemetry."""

from __future__ import annotations

from opentelemetry import context as otel_context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

from medmesh_runtime.telemetry import untraced, within


def test_spans_inside_untraced_are_not_recorded_and_outside_they_are() -> None:
    """Under the ParentBased sampler medmesh installs, untraced() blocks record no span, and
    the current context is back once the block ends."""
    provider = TracerProvider(
        resource=Resource.create({"service.name": "test"}),
        sampler=ParentBased(TraceIdRatioBased(1.0)),
    )
    tracer = provider.get_tracer("test")
    with untraced(), tracer.start_as_current_span("internal write") as inside:
        assert not inside.is_recording()
    with tracer.start_as_current_span("request hop") as outside:
        assert outside.is_recording()


def test_within_joins_a_kept_context_and_ignores_anything_else() -> None:
    """A span started within a kept context is in that context's trace; within(None) and
    within(other objects) leave the current context as it is."""
    provider = TracerProvider(sampler=ParentBased(TraceIdRatioBased(1.0)))
    tracer = provider.get_tracer("test")
    with tracer.start_as_current_span("event") as event:
        kept = otel_context.get_current()
    with within(kept), tracer.start_as_current_span("publish") as publish:
        assert publish.get_span_context().trace_id == event.get_span_context().trace_id
    for nothing in (None, "not a context"):
        with within(nothing), tracer.start_as_current_span("alone") as alone:
            assert alone.get_span_context().trace_id != event.get_span_context().trace_id
