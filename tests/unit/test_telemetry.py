"""Tracing helpers of medmesh_runtime.telemetry."""

from __future__ import annotations

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

from medmesh_runtime.telemetry import untraced


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
