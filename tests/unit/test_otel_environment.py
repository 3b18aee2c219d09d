"""The standard OTEL_* variables are honoured beside medmesh's own settings."""

from __future__ import annotations

import pytest
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased

from medmesh_runtime.otel import (
    otlp_metrics_from_environment,
    otlp_traces_from_environment,
    service_resource,
    traces_sampler,
)


def test_without_variables_the_resource_is_medmeshs(monkeypatch: pytest.MonkeyPatch) -> None:
    """No OTEL_* variable: service.name medmesh-<service>, service.instance.id the instance."""
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES", raising=False)
    attributes = service_resource("router", "router-0").attributes
    assert attributes["service.name"] == "medmesh-router"
    assert attributes["service.instance.id"] == "router-0"


def test_otel_service_name_and_resource_attributes_win(monkeypatch: pytest.MonkeyPatch) -> None:
    """OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES name the resource where they say so."""
    monkeypatch.setenv("OTEL_SERVICE_NAME", "router-north")
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=prod,k8s.pod.name=r-1")
    attributes = service_resource("router", "router-0").attributes
    assert attributes["service.name"] == "router-north"
    assert attributes["deployment.environment"] == "prod"
    assert attributes["k8s.pod.name"] == "r-1"
    assert attributes["service.instance.id"] == "router-0"


def test_otel_traces_sampler_replaces_the_ratio(monkeypatch: pytest.MonkeyPatch) -> None:
    """OTEL_TRACES_SAMPLER=always_off is used as is; without it, parent-based ratio sampling."""
    assert isinstance(traces_sampler(0.5, {}), ParentBased)
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_off")
    assert traces_sampler(0.5, {"OTEL_TRACES_SAMPLER": "always_off"}) is ALWAYS_OFF


def test_otlp_exporters_follow_the_endpoint_and_exporter_variables() -> None:
    """Spans go over OTLP when an OTEL endpoint is set and OTEL_TRACES_EXPORTER is not none;
    metrics are pushed too only when OTEL_METRICS_EXPORTER names otlp."""
    endpoint = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}
    assert otlp_traces_from_environment(endpoint)
    assert otlp_traces_from_environment({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318"})
    assert not otlp_traces_from_environment({})
    assert not otlp_traces_from_environment(endpoint | {"OTEL_TRACES_EXPORTER": "none"})
    assert not otlp_metrics_from_environment(endpoint)
    assert otlp_metrics_from_environment(endpoint | {"OTEL_METRICS_EXPORTER": "prometheus,otlp"})
