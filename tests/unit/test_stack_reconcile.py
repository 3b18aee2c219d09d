"""Stack.reconcile: a model folder or version folder added while the stack runs is rendered for
Triton's next load (the local half of a hot deploy)."""

from __future__ import annotations

import shutil
from pathlib import Path

from medmesh_cli.devstack.model_repository import render_model_repository, version_folders
from medmesh_cli.devstack.stack import Stack, StackConfig

MODELS = Path(__file__).resolve().parents[2] / "deploy" / "triton" / "models"


def _stack(tmp_path: Path) -> tuple[Stack, Path, Path]:
    source, served = tmp_path / "models", tmp_path / "served"
    shutil.copytree(MODELS / "deterioration", source / "deterioration")
    config = StackConfig(
        state_dir=tmp_path / "state", model_repository_override=source, topology="monolith"
    )
    stack = Stack(config)
    stack.triton.served_repository = render_model_repository(source, served, 0)
    return stack, source, served


def test_a_new_model_folder_is_rendered_and_nothing_else_is_touched(tmp_path: Path) -> None:
    """An ONNX folder dropped into the repository is rendered (as the python runner); a second
    reconcile has nothing to do."""
    stack, source, served = _stack(tmp_path)
    assert stack.reconcile() == []
    shutil.copytree(MODELS / "deterioration-gbt", source / "deterioration-gbt")
    assert stack.reconcile() == ["rendered Triton model deterioration-gbt"]
    assert (served / "deterioration-gbt" / "1" / "model.onnx").is_file()
    assert 'backend: "python"' in (served / "deterioration-gbt" / "config.pbtxt").read_text()
    assert stack.reconcile() == []


def test_a_new_version_folder_of_a_served_model_is_rendered(tmp_path: Path) -> None:
    """deterioration/5 added beside 1 and 2 re-renders deterioration, so a load serves 5 too."""
    stack, source, served = _stack(tmp_path)
    shutil.copytree(source / "deterioration" / "1", source / "deterioration" / "5")
    assert stack.reconcile() == ["rendered Triton model deterioration"]
    assert version_folders(served / "deterioration") == [1, 2, 5]
