"""The Grafana dashboards and the Prometheus alert rules of medmesh, defined once.

    .venv/bin/python deploy/k8s/generate.py

writes them as deploy/observability/grafana/*.json (provisioned by compose.observability.yaml)
and deploy/observability/alerts.yml (Prometheus' rule file there), and wraps them for Kubernetes
(a ConfigMap for Grafana's dashboard sidecar, a PrometheusRule for the Prometheus Operator). tests/conformance/test_observability_static.py fails while the files are
out of date, and tests/e2e/test_observability.py checks that every metric they query is one the
running services (or Triton) export.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
DATASOURCE = {"type": "prometheus", "uid": "prometheus"}


@dataclass(frozen=True)
class Panel:
    """One time-series panel: its queries (PromQL, legend) and the unit of its y axis."""

    title: str
    queries: tuple[tuple[str, str], ...]
    unit: str = "short"
    description: str = ""


@dataclass(frozen=True)
class Dashboard:
    """One dashboard: panels two to a row, 8 high."""

    uid: str
    title: str
    description: str
    panels: tuple[Panel, ...]
    annotations: tuple[tuple[str, str], ...] = field(default=())  # (name, PromQL)


PIPELINE = Dashboard(
    "medmesh-pipeline",
    "medmesh pipeline",
    "Throughput, lag, dead letters and Triton, hop by hop.",
    (
        Panel(
            "Consumer lag per group (messages)",
            (("sum by (consumer_group) (medmesh_consumer_lag)", "{{consumer_group}}"),),
            description="End offset minus committed offset, summed over the group's partitions",
        ),
        Panel(
            "Dead letters by service and source topic (/s)",
            (
                (
                    "sum by (service, source_topic) (rate(medmesh_dead_letters_total[5m]))",
                    "{{service}} <- {{source_topic}}",
                ),
            ),
            unit="ops",
        ),
        Panel(
            "Follower messages processed per topic (/s)",
            (
                (
                    "sum by (messaging_destination_publish_name)"
                    " (rate(messaging_process_messages_message_total[1m]))",
                    "{{messaging_destination_publish_name}}",
                ),
            ),
            unit="ops",
            description="faststream subscribers: the router's registry, heartbeat and result"
            " followers (the stages' transactional loops are counted by their own metrics)",
        ),
        Panel(
            "Publish time per topic, p99 (acks=all)",
            (
                (
                    "histogram_quantile(0.99, sum by (le, messaging_destination_name)"
                    " (rate(messaging_publish_duration_seconds_bucket[5m])))",
                    "{{messaging_destination_name}}",
                ),
            ),
            unit="s",
        ),
        Panel(
            "Triton inference requests per model version (/s)",
            (
                (
                    "sum by (model, version) (rate(nv_inference_request_success[1m]))",
                    "{{model}} v{{version}}",
                ),
                (
                    "sum by (model, version) (rate(nv_inference_request_failure[1m]))",
                    "{{model}} v{{version}} failed",
                ),
            ),
            unit="ops",
        ),
        Panel(
            "Triton queue vs compute time per request",
            (
                (
                    "sum by (model, version) (rate(nv_inference_queue_duration_us[1m]))"
                    " / sum by (model, version) (rate(nv_inference_request_success[1m]))",
                    "{{model}} v{{version}} queue",
                ),
                (
                    "sum by (model, version) (rate(nv_inference_compute_infer_duration_us[1m]))"
                    " / sum by (model, version) (rate(nv_inference_request_success[1m]))",
                    "{{model}} v{{version}} compute",
                ),
            ),
            unit="µs",
        ),
    ),
)

MODELS = Dashboard(
    "medmesh-models",
    "medmesh models",
    "Per model version: traffic, outcomes, latency and live workers.",
    (
        Panel(
            "Tasks routed per version and reason (/s)",
            (
                (
                    "sum by (model, model_version, reason) (rate(medmesh_router_tasks_total[1m]))",
                    "{{model}} v{{model_version}} {{reason}}",
                ),
            ),
            unit="ops",
        ),
        Panel(
            "Failed requests per version and kind (/s)",
            (
                (
                    "sum by (model, model_version, outcome)"
                    ' (rate(medmesh_inference_requests_total{outcome!="completed"}[5m]))',
                    "{{model}} v{{model_version}} {{outcome}}",
                ),
            ),
            unit="ops",
        ),
        Panel(
            "Request to result, p50 and p99 per version",
            (
                (
                    "histogram_quantile(0.5, sum by (le, model, model_version)"
                    " (rate(medmesh_inference_request_duration_seconds_bucket[5m])))",
                    "{{model}} v{{model_version}} p50",
                ),
                (
                    "histogram_quantile(0.99, sum by (le, model, model_version)"
                    " (rate(medmesh_inference_request_duration_seconds_bucket[5m])))",
                    "{{model}} v{{model_version}} p99",
                ),
            ),
            unit="s",
        ),
        Panel(
            "Triton call per batch, p99, and batch size, mean",
            (
                (
                    "histogram_quantile(0.99, sum by (le, model, model_version)"
                    " (rate(medmesh_inference_triton_duration_seconds_bucket[5m])))",
                    "{{model}} v{{model_version}} Triton p99 (s)",
                ),
                (
                    "sum by (model, model_version) (rate(medmesh_inference_batch_size_sum[5m]))"
                    " / sum by (model, model_version) (rate(medmesh_inference_batch_size_count[5m]))",
                    "{{model}} v{{model_version}} batch size",
                ),
            ),
        ),
        Panel(
            "Live workers per version",
            (
                (
                    "sum by (model, model_version) (medmesh_router_live_workers)",
                    "{{model}} v{{model_version}}",
                ),
            ),
            description="Ready workers with a recent heartbeat, as the router sees them",
        ),
    ),
)

ROLLOUTS = Dashboard(
    "medmesh-rollouts",
    "medmesh rollouts",
    "Each rollout over time: the weights the router applies, the step, and the controller's"
    " verdicts (rollbacks marked). The figures behind each decision are on medmesh.models.audit"
    " (`medmesh models history`).",
    (
        Panel(
            "Traffic weight per version (%)",
            (
                (
                    "max by (model, model_version) (medmesh_router_weight_percent)",
                    "{{model}} v{{model_version}}",
                ),
            ),
            unit="percent",
        ),
        Panel(
            "Rollout step per model",
            (
                (
                    "max by (model, model_version, phase) (medmesh_router_rollout_step)",
                    "{{model}} v{{model_version}} {{phase}}",
                ),
            ),
        ),
        Panel(
            "Controller verdicts (per 5 min)",
            (
                (
                    "sum by (model, verdict) (increase(medmesh_router_rollout_evaluations_total[5m]))",
                    "{{model}} {{verdict}}",
                ),
            ),
        ),
        Panel(
            "Canary vs stable: failed share per version",
            (
                (
                    "sum by (model, model_version)"
                    ' (rate(medmesh_inference_requests_total{outcome!="completed"}[5m]))'
                    " / sum by (model, model_version) (rate(medmesh_inference_requests_total[5m]))",
                    "{{model}} v{{model_version}}",
                ),
            ),
            unit="percentunit",
        ),
    ),
    annotations=(
        (
            "rollbacks",
            'sum by (model) (increase(medmesh_router_rollout_evaluations_total{verdict="rollback"}[1m])) > 0',
        ),
    ),
)

DASHBOARDS = (PIPELINE, MODELS, ROLLOUTS)

# Prometheus alert rules: (name, PromQL, for, severity, summary, description).
ALERTS: tuple[tuple[str, str, str, str, str, str], ...] = (
    (
        "MedmeshDeadLettersGrowing",
        "sum by (service, source_topic) (increase(medmesh_dead_letters_total[10m])) > 0",
        "0m",
        "warning",
        "{{ $labels.service }} dead-lettered records from {{ $labels.source_topic }}",
        "Records were parked on a dead-letter topic in the last 10 minutes. `medmesh dlq list` and"
        " `medmesh dlq show <topic>` say why; replay them after the fix.",
    ),
    (
        "MedmeshConsumerLagHigh",
        "sum by (consumer_group) (medmesh_consumer_lag) > 1000",
        "5m",
        "warning",
        "{{ $labels.consumer_group }} is {{ $value }} messages behind",
        "The group has kept over 1000 unconsumed messages for 5 minutes: a stage too slow for"
        " its traffic (scale it out: KEDA does for workers in the large overlay) or stalled.",
    ),
    (
        "MedmeshRolloutRolledBack",
        'sum by (model) (increase(medmesh_router_rollout_evaluations_total{verdict="rollback"}[15m])) > 0',
        "0m",
        "critical",
        "The rollout of {{ $labels.model }} was rolled back",
        "The controller rolled a canary back (error rate, latency or shadow agreement beyond the"
        " policy). `medmesh models history <model>` shows the figures it judged on.",
    ),
    (
        "MedmeshWorkerHeartbeatsStopped",
        "max by (model, model_version) (medmesh_router_live_workers) == 0",
        "1m",
        "critical",
        "No live worker for {{ $labels.model }} v{{ $labels.model_version }}",
        "Every worker of this version stopped sending ready heartbeats: the router sends a"
        " canary's share to stable; a stable version's tasks wait in Kafka.",
    ),
    (
        "MedmeshInferenceFailuresHigh",
        "sum by (model, model_version) "
        '(rate(medmesh_inference_requests_total{outcome!="completed"}[10m]))'
        " / sum by (model, model_version) (rate(medmesh_inference_requests_total[10m])) > 0.05",
        "10m",
        "warning",
        "{{ $labels.model }} v{{ $labels.model_version }} fails {{ $value | humanizePercentage }}"
        " of its requests",
        "More than 5 % of the version's requests failed for 10 minutes (invalid inputs, Triton"
        " errors, retries exhausted): `medmesh dlq show medmesh.inference.failed`.",
    ),
    (
        "MedmeshSubscriptionEventsMissed",
        'sum (increase(medmesh_ingest_subscription_gaps_total{outcome=~"failed|cut"}[15m])) > 0',
        "0m",
        "warning",
        "Subscription events that never arrived could not be recovered",
        "A source's notification counters showed events ingest never received, and asking the"
        " source for them ($events) failed or was beyond the recovery cap: ingest's log lines"
        " `missed subscription events not recovered` / `... beyond the recovery cap not asked"
        " for` name the subscription, the missing event numbers and why. Fix the source's"
        " FHIR server settings (MEDMESH_INGEST_SOURCES) or ask the EHR to resend them.",
    ),
)


def dashboard_json(dashboard: Dashboard) -> dict[str, Any]:
    """The Grafana dashboard model (schemaVersion 39)."""
    panels = []
    for index, panel in enumerate(dashboard.panels):
        panels.append(
            {
                "id": index + 1,
                "type": "timeseries",
                "title": panel.title,
                "description": panel.description,
                "gridPos": {"x": 12 * (index % 2), "y": 8 * (index // 2), "w": 12, "h": 8},
                "datasource": DATASOURCE,
                "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []},
                "targets": [
                    {"refId": chr(ord("A") + i), "expr": expr, "legendFormat": legend}
                    for i, (expr, legend) in enumerate(panel.queries)
                ],
            }
        )
    annotations = [
        {
            "name": name,
            "datasource": DATASOURCE,
            "enable": True,
            "iconColor": "red",
            "expr": expr,
            "titleFormat": f"{name}: {{{{model}}}}",
        }
        for name, expr in dashboard.annotations
    ]
    return {
        "title": dashboard.title,
        "uid": dashboard.uid,
        "description": dashboard.description,
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-30m", "to": "now"},
        "refresh": "10s",
        "tags": ["medmesh"],
        "templating": {"list": []},
        "annotations": {"list": annotations},
        "panels": panels,
    }


def alert_rules() -> dict[str, Any]:
    """The Prometheus rule file (one group)."""
    return {
        "groups": [
            {
                "name": "medmesh",
                "rules": [
                    {
                        "alert": name,
                        "expr": expr,
                        "for": duration,
                        "labels": {"severity": severity},
                        "annotations": {"summary": summary, "description": description},
                    }
                    for name, expr, duration, severity, summary, description in ALERTS
                ],
            }
        ]
    }


GENERATED = "# Generated by deploy/observability/dashboards.py: do not edit.\n"


def outputs() -> dict[Path, str]:
    """Every generated file and its expected content."""
    files = {
        HERE / "grafana" / f"{d.uid}.json": json.dumps(dashboard_json(d), indent=2) + "\n"
        for d in DASHBOARDS
    }
    files[HERE / "alerts.yml"] = GENERATED + yaml.safe_dump(
        alert_rules(), sort_keys=False, width=100, allow_unicode=True
    )
    return files


def queries() -> list[str]:
    """Every PromQL expression of the dashboards, their annotations and the alerts."""
    return [
        *(expr for d in DASHBOARDS for p in d.panels for expr, _ in p.queries),
        *(expr for d in DASHBOARDS for _, expr in d.annotations),
        *(expr for _, expr, *_ in ALERTS),
    ]
