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
from opentelemetry.sdk.metrics import Histogram, MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from medmesh_runtime.otel import otlp_metrics_from_environment, service_resource

PROMETHEUS_CONTENT_TYPE = CONTENT_TYPE_LATEST

_provider: MeterProvider | None = None

# Every histogram in seconds (medmesh's durations, faststream's messaging.*.duration) gets bucket
# boundaries for its range, 1 ms to 60 s: the SDK's defaults (0 to 10,000) are made for
# milliseconds and would put every duration in the first bucket.
SECONDS_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0
)  # fmt: skip
SECONDS_VIEW = View(
    instrument_type=Histogram,
    instrument_unit="s",
    aggregation=ExplicitBucketHistogramAggregation(SECONDS_BUCKETS),
)


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
            resource=service_resource(service, instance),
            metric_readers=readers,
            views=[SECONDS_VIEW],
        )
        metrics.set_meter_provider(_provider)
    return _provider


def meter(name: str) -> Meter:
    """A meter on the configured provider (a no-op meter before configure_metrics)."""
    return metrics.get_meter(name)


def prometheus_text() -> bytes:
    """Every metric of this process in the Prometheus exposition format."""
    return generate_latest(REGISTRY)
