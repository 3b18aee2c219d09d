"""The compose observability layer: valid Compose, every medmesh service exports traces, the
dashboards and alert rules generated, current and provisioned."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import yaml

from tests.modules import load_file

ROOT = Path(__file__).resolve().parents[2]
LAYER = ROOT / "deploy" / "observability" / "compose.observability.yaml"
DASHBOARDS = load_file(
    ROOT / "deploy" / "observability" / "dashboards.py", "observability_dashboards"
)


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


def test_dashboards_and_alerts_are_generated_and_current() -> None:
    """The Grafana dashboards and the alert rules are what deploy/observability/dashboards.py
    defines (run deploy/k8s/generate.py after changing a panel or an alert)."""
    for path, text in DASHBOARDS.outputs().items():
        assert path.read_text() == text, f"{path.name} is out of date"


def test_every_dashboard_and_the_alert_rules_are_provisioned() -> None:
    """The layer mounts every generated dashboard into Grafana and the rule file into
    Prometheus, whose configuration loads it."""
    layer = yaml.safe_load(LAYER.read_text())["services"]
    grafana = {v.split(":")[0] for v in layer["grafana"]["volumes"]}
    for dashboard in DASHBOARDS.DASHBOARDS:
        assert f"./grafana/{dashboard.uid}.json" in grafana
    mounts = dict(v.split(":")[:2] for v in layer["prometheus"]["volumes"])
    config = yaml.safe_load((LAYER.parent / "prometheus.yml").read_text())
    assert config["rule_files"] == [mounts["./alerts.yml"]]


def test_alert_rules_have_the_shape_prometheus_loads() -> None:
    """Each rule has a unique alert name, an expression, a duration, a severity and a summary."""
    rules = yaml.safe_load((LAYER.parent / "alerts.yml").read_text())["groups"][0]["rules"]
    names = [r["alert"] for r in rules]
    assert len(set(names)) == len(names) >= 5
    for rule in rules:
        assert rule["expr"]
        assert rule["for"].endswith("m")
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"]
        assert rule["annotations"]["description"]


def test_prometheus_scrapes_every_medmesh_service_of_compose() -> None:
    """Prometheus' configuration names each medmesh service of compose.yaml (static targets on
    MEDMESH_METRICS_PORT, or a worker service by DNS), the console included."""
    base = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]
    medmesh = {
        name
        for name, svc in base.items()
        if svc.get("command", [None, None, ""])[:2] == ["python", "-m"]
        and str(svc["command"][2]).startswith("medmesh_")
    }
    assert "console" in medmesh
    config = yaml.safe_load((LAYER.parent / "prometheus.yml").read_text())
    scraped = set()
    for job in config["scrape_configs"]:
        for static in job.get("static_configs", []):
            scraped |= {target.split(":")[0] for target in static["targets"]}
        for found in job.get("dns_sd_configs", []):
            scraped |= set(found["names"])
    assert medmesh - scraped == set()
