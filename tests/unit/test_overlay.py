"""Overlays: extra model versions merged into a local stack's specs and Triton repository."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from medmesh_cli.devstack.overlay import merged_spec, with_overlay
from medmesh_cli.devstack.paths import repo_root
from medmesh_cli.devstack.stack import StackConfig
from medmesh_cli.devstack.triton import repository_models
from medmesh_contracts.modelspec import load_specs

DRILL = repo_root() / "deploy" / "drills" / "broken-v3"
SPEC = repo_root() / "deploy" / "models" / "deterioration.yaml"


def test_the_drill_overlay_adds_version_3_to_spec_and_repository(tmp_path: Path) -> None:
    """The broken-v3 drill serves v1, v2 and v3; deploy/ itself is left as it was."""
    config = with_overlay(StackConfig(state_dir=tmp_path), DRILL)
    spec = load_specs(config.specs_dir)["deterioration"]
    assert [v.version for v in spec.versions] == [1, 2, 3]
    assert spec.routing.weights == {1: 100}
    assert repository_models(config.model_repository)["deterioration"] == [1, 2, 3]
    assert [v.version for v in load_specs(SPEC.parent)["deterioration"].versions] == [1, 2]


def test_an_overlay_may_not_redefine_a_version() -> None:
    """Appending a version the spec already has fails, naming the version."""
    document = yaml.safe_load(SPEC.read_text())
    with pytest.raises(ValueError, match=r"\[2\]"):
        merged_spec(document, [document["versions"][1]])


def test_an_overlay_version_must_be_a_valid_spec_entry() -> None:
    """A version entry missing required fields fails validation before anything starts."""
    document = yaml.safe_load(SPEC.read_text())
    with pytest.raises(ValueError, match="score"):
        merged_spec(document, [{"version": 9, "triton_version": 9, "algorithm": "x"}])
