"""What the standard OpenTelemetry variables decide for a medmesh process, beside its settings.

- ``OTEL_SERVICE_NAME`` and ``OTEL_RESOURCE_ATTRIBUTES`` name the resource; without them a
  service is ``medmesh-<service>`` with its ``MEDMESH_INSTANCE_ID`` as ``service.instance.id``
  (the variables win where both say something).
- ``OTEL_EXPORTER_OTLP_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` (and the exporter's
  other ``OTEL_EXPORTER_OTLP_*`` variables: headers, certificate, timeout) send spans over
  OTLP/HTTP when ``MEDMESH_OTLP_TRACES_ENDPOINT`` is unset; ``OTEL_TRACES_EXPORTER=none`` sends
  none.
- ``OTEL_TRACES_SAMPLER`` (with ``OTEL_TRACES_SAMPLER_ARG``) replaces the sampler of
  ``MEDMESH_TRACE_SAMPLE_RATIO``.
- ``OTEL_SEMCONV_STABILITY_OPT_IN`` chooses the HTTP instrumentation's conventions; unset, the
  stable ones (seconds).
- ``OTEL_METRICS_EXPORTER`` naming ``otlp`` pushes metrics over OTLP/HTTP too (every
  ``OTEL_METRIC_EXPORT_INTERVAL``); ``/metrics`` (Prometheus) is always served: it is how the
  compose and Kubernetes deployments are scraped.

The SDK reads most of these itself once asked; this module says when to ask it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from opentelemetry.sdk.resources import OTELResourceDetector, Resource
from opentelemetry.sdk.trace.sampling import (
    ParentBased,
    Sampler,
    TraceIdRatioBased,
    _get_from_env_or_default,
)

_TRACES_ENDPOINTS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")


def _listed(variable: str, environ: Mapping[str, str]) -> set[str]:
    return {part.strip().lower() for part in environ.get(variable, "").split(",") if part.strip()}


def service_resource(service: str, instance: str) -> Resource:
    """The process's resource: medmesh's names, then what OTEL_SERVICE_NAME and
    OTEL_RESOURCE_ATTRIBUTES say (they win)."""
    ours = Resource.create({"service.name": f"medmesh-{service}", "service.instance.id": instance})
    return ours.merge(OTELResourceDetector().detect())


def traces_sampler(ratio: float, environ: Mapping[str, str] = os.environ) -> Sampler:
    """OTEL_TRACES_SAMPLER's sampler when set, else parent-based sampling at ``ratio``."""
    if environ.get("OTEL_TRACES_SAMPLER"):
        return _get_from_env_or_default()
    return ParentBased(TraceIdRatioBased(ratio))


def otlp_traces_from_environment(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether the OTEL_* variables ask for spans over OTLP (an endpoint, and not
    OTEL_TRACES_EXPORTER=none)."""
    if "none" in _listed("OTEL_TRACES_EXPORTER", environ):
        return False
    return any(environ.get(name) for name in _TRACES_ENDPOINTS)


def use_stable_http_conventions() -> None:
    """HTTP instrumentations (e.g. FastAPI's) record the stable HTTP conventions
    (``http.server.request.duration`` in seconds, ``http.request.method``...) instead of the
    old ones (milliseconds), unless OTEL_SEMCONV_STABILITY_OPT_IN already says otherwise. Set
    before the first instrumentation reads it (once per process)."""
    os.environ.setdefault("OTEL_SEMCONV_STABILITY_OPT_IN", "http")


def otlp_metrics_from_environment(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether OTEL_METRICS_EXPORTER asks for metrics over OTLP as well."""
    return "otlp" in _listed("OTEL_METRICS_EXPORTER", environ)
