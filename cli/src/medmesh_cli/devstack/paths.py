"""Where the local stack keeps things: the repository, a cache outside it, run state inside it."""

from __future__ import annotations

import os
from pathlib import Path


def repo_root() -> Path:
    """The medmesh checkout this code runs from (the folder holding deploy/ and contracts/)."""
    override = os.environ.get("MEDMESH_REPO_ROOT")
    if override:
        return Path(override).resolve()
    here = Path(__file__).resolve()
    for parent in here.parents:
        if (parent / "deploy" / "kafka" / "pom.xml").is_file():
            return parent
    raise RuntimeError(f"cannot find the medmesh repository above {here}; set MEDMESH_REPO_ROOT")


def cache_dir() -> Path:
    """Downloads that outlive a checkout (Kafka jars, Triton backends): ~/.cache/medmesh."""
    base = os.environ.get("MEDMESH_CACHE_DIR") or Path.home() / ".cache" / "medmesh"
    path = Path(base)
    path.mkdir(parents=True, exist_ok=True)
    return path


def run_dir(name: str = "stack") -> Path:
    """State of one local run (broker data, logs, spans): var/<name> in the checkout."""
    path = repo_root() / "var" / name
    path.mkdir(parents=True, exist_ok=True)
    return path
