"""The compose observability layer: valid Compose, every medmesh service exports traces."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import yaml

ROOT = Path(__file__).resolve().parents[2]
LAYER = ROOT / "deploy" / "observability" / "compose.observability.yaml"


def test_observability_layer_is_valid_compose() -> None:
    """compose.observability.yaml validates against the vendored Compose specification."""
    schema = json.loads((ROOT / "deploy" / "schemas" / "compose-spec.json").read_text())
    jsonschema.validate(yaml.safe_load(LAYER.read_text()), schema)


def test_every_medmesh_service_of_compose_gets_the_otlp_endpoint() -> None:
    """Each medmesh service in compose.yaml is given MEDMESH_OTLP_TRACES_ENDPOINT by the layer."""
    base = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]
    layer = yaml.safe_load(LAYER.read_text())["services"]
    medmesh = {
        name
        for name, svc in base.items()
        if svc.get("command", [None, None, ""])[:2] == ["python", "-m"]
        and str(svc["command"][2]).startswith("medmesh_")
    }
    assert medmesh
    for name in medmesh:
        assert "MEDMESH_OTLP_TRACES_ENDPOINT" in layer[name]["environment"], name


def test_layer_mounts_only_files_that_exist() -> None:
    """Every file the layer mounts (collector, Prometheus, Grafana) is in the repository."""
    layer = yaml.safe_load(LAYER.read_text())["services"]
    for service in layer.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            assert (LAYER.parent / source).is_file(), source


def test_dashboard_queries_metrics_the_services_export() -> None:
    """The Grafana dashboard queries the faststream messaging and medmesh dead-letter metrics."""
    dashboard = json.loads((LAYER.parent / "grafana" / "medmesh-pipeline.json").read_text())
    queries = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    for metric in (
        "messaging_process_messages_total",
        "messaging_publish_duration_seconds_bucket",
        "medmesh_dead_letters_total",
        "nv_inference_request_success",
    ):
        assert metric in queries
