"""Model cards: the spec's card figures are the training script's, and they reach the Device."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from medmesh_contracts.modelspec import load_specs
from medmesh_reporting.report import build_report
from tests.factories import make_completed, make_task

ROOT = Path(__file__).resolve().parents[2]
SPECS = load_specs(ROOT / "deploy" / "models")
CARDS = [
    (spec.name, version.version)
    for spec in SPECS.values()
    for version in spec.versions
    if version.card is not None
]


@pytest.mark.parametrize(("model", "version"), CARDS, ids=[f"{m}-v{v}" for m, v in CARDS])
def test_card_metrics_are_the_training_scripts_held_out_figures(model: str, version: int) -> None:
    """Every metric a spec card quotes equals metrics.json beside the model (the script's)."""
    spec_version = SPECS[model].version(version)
    card = spec_version.card
    assert card is not None
    assert card.document is not None
    measured = json.loads((ROOT / card.document).parent.joinpath("metrics.json").read_text())
    assert card.metrics
    for name, value in card.metrics.items():
        assert measured[name] == value, name
    assert (ROOT / card.document).parent.name == spec_version.triton.model


def test_the_onnx_version_reports_its_card_on_the_device() -> None:
    """deterioration v3's Device notes carry its intended use, limitations and held-out AUROC."""
    bundle = build_report(
        make_completed(make_task(model_version=3)),
        SPECS["deterioration"],
        issued=datetime(2026, 11, 23, 8, 31, tzinfo=UTC),
    )
    device = next(
        e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Device"
    )
    notes = [n["text"] for n in device["note"]]
    assert any(n.startswith("Intended use: ") for n in notes)
    assert any(n.startswith("Limitations: Trained and tested on synthetic data") for n in notes)
    assert any("auroc 0.9197" in n for n in notes)
