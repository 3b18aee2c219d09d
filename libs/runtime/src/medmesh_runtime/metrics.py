"""OpenTelemetry metrics, exposed in Prometheus' text format at /metrics on every service.

The faststream telemetry middleware records messaging.process/publish durations and message
counts per topic on this provider; services add their own instruments (per model version, dead
letters) with ``meter(...)``.
"""

from __future__ import annotations

from opentelemetry import metrics
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.metrics import Meter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from medmesh_runtime.otel import otlp_metrics_from_environment, service_resource

PROMETHEUS_CONTENT_TYPE = CONTENT_TYPE_LATEST

_provider: MeterProvider | None = None


def configure_metrics(service: str, instance: str) -> MeterProvider:
    """The process's MeterProvider, read by Prometheus (created once per process), and pushed
    over OTLP too when OTEL_METRICS_EXPORTER names otlp (medmesh_runtime.otel)."""
    global _provider  # noqa: PLW0603 -- one Prometheus registry per process, like the tracer provider
    if _provider is None:
        readers: list[MetricReader] = [PrometheusMetricReader()]
        if otlp_metrics_from_environment():
            # Endpoint and interval from OTEL_EXPORTER_OTLP_* and OTEL_METRIC_EXPORT_INTERVAL.
            readers.append(PeriodicExportingMetricReader(OTLPMetricExporter()))
        _provider = MeterProvider(
            resource=service_resource(service, instance), metric_readers=readers
        )
        metrics.set_meter_provider(_provider)
    return _provider


def meter(name: str) -> Meter:
    """A meter on the configured provider (a no-op meter before configure_metrics)."""
    return metrics.get_meter(name)


def prometheus_text() -> bytes:
    """Every metric of this process in the Prometheus exposition format."""
    return generate_latest(REGISTRY)
