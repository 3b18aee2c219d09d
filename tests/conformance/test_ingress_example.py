"""The example TLS Ingress of ingest (deploy/k8s/examples): valid, and exposing /fhir only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import yaml

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "deploy" / "k8s" / "examples" / "ingress-tls.yaml"
K8S_VERSION = "1.30"


def ingress() -> dict[str, Any]:
    """The example Ingress as YAML."""
    doc: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    return doc


def test_the_example_ingress_is_valid_kubernetes() -> None:
    """The example validates against Kubernetes' strict schema for the oldest supported version."""
    kubernetes_validate.validate(ingress(), K8S_VERSION, strict=True)


def test_the_example_ingress_terminates_tls_for_its_host() -> None:
    """TLS is configured for every host the Ingress routes, and plain HTTP is redirected."""
    spec = ingress()["spec"]
    tls_hosts = {host for entry in spec["tls"] for host in entry["hosts"]}
    assert {rule["host"] for rule in spec["rules"]} <= tls_hosts
    assert all(entry["secretName"] for entry in spec["tls"])
    annotations = ingress()["metadata"]["annotations"]
    assert annotations["nginx.ingress.kubernetes.io/ssl-redirect"] == "true"


def test_the_example_ingress_routes_only_fhir_to_ingest_http() -> None:
    """Only /fhir reaches ingest (never /metrics, /docs or the probes), on the Service's http port."""
    base = yaml.safe_load_all((ROOT / "deploy" / "k8s" / "base" / "ingest.yaml").read_text())
    service = next(d for d in base if d["kind"] == "Service")
    port_names = {p["name"] for p in service["spec"]["ports"]}
    paths = [p for rule in ingress()["spec"]["rules"] for p in rule["http"]["paths"]]
    assert [(p["path"], p["pathType"]) for p in paths] == [("/fhir", "Prefix")]
    for path in paths:
        backend = path["backend"]["service"]
        assert backend["name"] == service["metadata"]["name"]
        assert backend["port"]["name"] in port_names
