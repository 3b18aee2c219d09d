"""Overlays: extra model versions merged into a local stack's specs and Triton repository."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from medmesh_cli.devstack.overlay import merged_spec, with_overlay
from medmesh_cli.devstack.paths import repo_root
from medmesh_cli.devstack.stack import StackConfig
from medmesh_cli.devstack.triton import repository_models
from medmesh_contracts.modelspec import load_specs

DRILL = repo_root() / "deploy" / "drills" / "broken-v4"
SPEC = repo_root() / "deploy" / "models" / "deterioration.yaml"


def _drill_entry() -> dict[str, Any]:
    """The drill's version 4 entry (medmesh.ModelSpec/2 ``versions`` format)."""
    entries: dict[str, list[dict[str, Any]]] = yaml.safe_load((DRILL / "versions.yaml").read_text())
    [entry] = entries["deterioration"]
    return entry


def test_the_drill_overlay_adds_version_4_to_spec_and_repository(tmp_path: Path) -> None:
    """The broken-v4 drill serves the spec's versions and v4; deploy/ itself is left as it was."""
    base = load_specs(SPEC.parent)["deterioration"]
    base_versions = [v.version for v in base.versions]
    config = with_overlay(StackConfig(state_dir=tmp_path), DRILL)
    spec = load_specs(config.specs_dir)["deterioration"]
    assert [v.version for v in spec.versions] == [*base_versions, 4]
    assert spec.routing.weights == base.routing.weights
    v4 = spec.version(4)
    assert (v4.triton.model, v4.triton.version) == ("deterioration", 4)
    assert [t.shape for t in v4.triton.inputs] == [(7,)]  # what Triton's config declares too
    assert v4.headline.kind == "risk-score"
    assert v4.explanation is not None
    assert repository_models(config.model_repository)["deterioration"] == [1, 2, 4]
    assert [v.version for v in load_specs(SPEC.parent)["deterioration"].versions] == base_versions


def test_the_merged_spec_keeps_the_base_spec_anchor_keys_valid() -> None:
    """The v2 base spec (with its top-level ``x-`` anchor keys) merges with the drill's entry."""
    document = yaml.safe_load(SPEC.read_text())
    assert any(str(key).startswith("x-") for key in document)
    merged = merged_spec(document, [_drill_entry()])
    assert [v["version"] for v in merged["versions"]][-1] == 4


def test_an_overlay_may_not_redefine_a_version() -> None:
    """Appending a version the spec already has fails, naming the version."""
    document = yaml.safe_load(SPEC.read_text())
    with pytest.raises(ValueError, match=r"\[2\]"):
        merged_spec(document, [document["versions"][1]])


def test_an_overlay_version_must_be_a_valid_spec_entry() -> None:
    """A version entry missing required fields fails validation before anything starts."""
    document = yaml.safe_load(SPEC.read_text())
    with pytest.raises(ValueError, match="triton") as missing:
        merged_spec(document, [{"version": 9, "algorithm": "x"}])
    assert "outputs" in str(missing.value)


def test_an_overlay_version_whose_outputs_miss_its_tensors_fails_naming_them() -> None:
    """A v2 entry whose outputs read a tensor its Triton model does not declare is refused."""
    document = yaml.safe_load(SPEC.read_text())
    entry = _drill_entry()
    entry["triton"]["outputs"] = [o for o in entry["triton"]["outputs"] if o["name"] != "RISK_BAND"]
    with pytest.raises(ValueError, match="RISK_BAND"):
        merged_spec(document, [entry])
