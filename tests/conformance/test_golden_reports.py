"""Golden reports: per model version (and FHIR version), the builder's output, field by field.

The goldens in tests/fixtures/reports/ were reviewed by hand (README there). A change to the report
shows up here as the list of FHIRPath-like fields that differ. Regenerate deliberately with
``MEDMESH_UPDATE_GOLDEN=1 .venv/bin/pytest tests/conformance/test_golden_reports.py`` and review
the diff.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from medmesh_contracts.events import FhirVersion, InferenceCompleted, SourceContext
from medmesh_contracts.modelspec import ModelSpec, load_spec
from medmesh_reporting.report import ai_disclaimer, build_report
from tests.conformance.report_checks import check_report_bundle
from tests.factories import make_completed, make_request, make_task

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "tests" / "fixtures" / "reports"
ISSUED = datetime(2026, 11, 23, 8, 31, tzinfo=UTC)
PERFORMER = "St Elsewhere NHS Trust clinical AI service"


def _completed(model_version: int, fhir_version: FhirVersion = "R4B") -> InferenceCompleted:
    request = make_request(
        encounter_reference="Encounter/enc-1", based_on_reference="ServiceRequest/sr-1"
    )
    if fhir_version in ("R4", "R5"):
        source = SourceContext(channel="http", fhir_version=fhir_version, site="site-a")
        request = request.model_copy(update={"source": source})
    return make_completed(make_task(request, model_version=model_version))


CASES: dict[str, tuple[int, FhirVersion]] = {
    "deterioration-v1-r4": (1, "R4"),
    "deterioration-v2-r4": (2, "R4"),
    "deterioration-v3-r4": (3, "R4"),
    "deterioration-v1-r4b": (1, "R4B"),
    "deterioration-v2-r4b": (2, "R4B"),
    "deterioration-v1-r5": (1, "R5"),
    "deterioration-v2-r5": (2, "R5"),
    "deterioration-v3-r4b": (3, "R4B"),
    "deterioration-v3-r5": (3, "R5"),
}


@pytest.fixture(scope="module")
def spec() -> ModelSpec:
    """The deterioration model's spec, as deployed."""
    return load_spec(ROOT / "deploy" / "models" / "deterioration.yaml")


def fields(node: Any, path: str = "Bundle") -> Iterator[tuple[str, Any]]:
    """Every leaf of a JSON tree with its path, e.g. ``Bundle.entry[1].resource.valueInteger``."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from fields(value, f"{path}.{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from fields(value, f"{path}[{index}]")
    else:
        yield path, node


def differences(expected: Any, actual: Any) -> list[str]:
    """The fields that differ, are missing or are extra, one line each."""
    want, got = dict(fields(expected)), dict(fields(actual))
    lines = []
    for path in sorted(want.keys() | got.keys()):
        if path not in got:
            lines.append(f"{path}: missing (expected {want[path]!r})")
        elif path not in want:
            lines.append(f"{path}: unexpected {got[path]!r}")
        elif want[path] != got[path] or type(want[path]) is not type(got[path]):
            lines.append(f"{path}: expected {want[path]!r}, got {got[path]!r}")
    return lines


@pytest.mark.parametrize("name", sorted(CASES))
def test_report_matches_its_golden_field_by_field(spec: ModelSpec, name: str) -> None:
    """The report for the fixed request equals its reviewed golden in every field."""
    model_version, fhir_version = CASES[name]
    bundle = build_report(
        _completed(model_version, fhir_version), spec, performer_display=PERFORMER, issued=ISSUED
    )
    path = GOLDEN / f"{name}.json"
    if os.environ.get("MEDMESH_UPDATE_GOLDEN") == "1":
        path.write_text(json.dumps(bundle, indent=2, ensure_ascii=False) + "\n")
    golden = json.loads(path.read_text())

    assert differences(golden, bundle) == []
    assert check_report_bundle(golden, fhir_version=fhir_version) == []


def test_goldens_hold_the_clinical_facts() -> None:
    """The goldens themselves say NEWS2 7 / high for v1 and 23.4 % / medium for v2 and v3, in
    their data and in the report's narrative, and every resource's narrative ends with the AI
    disclaimer of its model version."""
    for name, (model_version, _) in CASES.items():
        bundle = json.loads((GOLDEN / f"{name}.json").read_text())
        resources = {e["resource"]["resourceType"]: e["resource"] for e in bundle["entry"]}
        report, observation = resources["DiagnosticReport"], resources["Observation"]
        band = report["conclusionCode"][0]["coding"][0]["code"]
        narrative = report["text"]["div"]
        if model_version == 1:
            assert observation["valueInteger"] == 7, name
            assert band == "high", name
            assert observation["referenceRange"][0]["high"]["value"] == 4, name
            assert "<td>7</td><td>High clinical risk</td>" in narrative, name
        else:
            assert observation["valueQuantity"]["value"] == 23.4, name
            assert band == "medium", name
            assert "<td>23.4 %</td><td>Medium clinical risk</td>" in narrative, name
        assert report["performer"][0]["display"] == PERFORMER, name
        disclaimer = f"<b>{ai_disclaimer(f'deterioration v{model_version}')}</b></p></div>"
        for entry in bundle["entry"]:
            assert entry["resource"]["text"]["div"].endswith(disclaimer), name


def test_a_changed_field_is_named() -> None:
    """differences() names a changed, a missing and an unexpected field by path."""
    golden = {"a": [{"b": 1}, {"c": 2}]}
    actual = {"a": [{"b": 2}, {"d": 2}]}

    assert differences(golden, actual) == [
        "Bundle.a[0].b: expected 1, got 2",
        "Bundle.a[1].c: missing (expected 2)",
        "Bundle.a[1].d: unexpected 2",
    ]
