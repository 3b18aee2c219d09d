"""Overlays: extra model versions served by a local stack without touching deploy/.

An overlay folder holds ``versions.yaml`` (per model name, version entries in the model spec's
``versions`` format, medmesh.ModelSpec/2) and ``triton/<model>/<n>/`` version folders.
``with_overlay`` writes the merged specs and model repository under the stack's state folder and
points the stack at them, so a drill (deploy/drills/broken-v4: a version that fails every
request) runs through the same plugin contract as any version: a spec entry and a Triton version
folder. A merged spec is validated as ``load_spec`` reads it (``parse_spec``: top-level ``x-``
anchor keys dropped, a version 1 spec upgraded), so an overlay entry must match the base spec's
format.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

import yaml

from medmesh_cli.devstack.stack import StackConfig
from medmesh_contracts.modelspec import parse_spec


def merged_spec(spec: dict[str, Any], extra_versions: list[dict[str, Any]]) -> dict[str, Any]:
    """A spec document with the overlay's versions appended; ValueError on a version clash."""
    present = {v["version"] for v in spec["versions"]}
    clash = present & {v["version"] for v in extra_versions}
    if clash:
        raise ValueError(f"overlay redefines versions {sorted(clash)} of {spec['name']!r}")
    merged = {**spec, "versions": [*spec["versions"], *extra_versions]}
    parse_spec(merged)  # fails loudly, naming the field, before anything starts
    return merged


def with_overlay(config: StackConfig, overlay: Path) -> StackConfig:
    """``config`` serving the overlay's versions too (files written under its state folder)."""
    extra: dict[str, list[dict[str, Any]]] = yaml.safe_load((overlay / "versions.yaml").read_text())
    target = config.state_dir / "overlay"
    shutil.rmtree(target, ignore_errors=True)
    specs, repository = target / "specs", target / "models"
    specs.mkdir(parents=True)
    shutil.copytree(
        config.model_repository, repository, ignore=shutil.ignore_patterns("__pycache__")
    )
    names = set()
    for path in sorted(config.specs_dir.glob("*.yaml")):
        document: dict[str, Any] = yaml.safe_load(path.read_text())
        names.add(document["name"])
        if document["name"] in extra:
            document = merged_spec(document, extra[document["name"]])
        (specs / path.name).write_text(yaml.safe_dump(document, sort_keys=False))
    unknown = set(extra) - names
    if unknown:
        raise ValueError(f"overlay names models with no spec: {sorted(unknown)}")
    for version_dir in sorted((overlay / "triton").glob("*/*")):
        destination = repository / version_dir.parent.name / version_dir.name
        if destination.exists():
            raise ValueError(f"overlay version folder {version_dir} exists in the repository")
        shutil.copytree(version_dir, destination, ignore=shutil.ignore_patterns("__pycache__"))
    return dataclasses.replace(
        config, specs_dir_override=specs, model_repository_override=repository
    )
