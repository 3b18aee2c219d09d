"""SpecCatalog: a service learns a version added to a spec file without a restart."""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from medmesh_contracts.catalog import SpecCatalog

SPECS = Path(__file__).resolve().parents[2] / "deploy" / "models"


class Clock:
    """A hand-moved monotonic clock."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _copy_specs(tmp_path: Path) -> Path:
    folder = tmp_path / "models"
    shutil.copytree(SPECS, folder)
    return folder


def _add_version(folder: Path, number: int) -> None:
    path = folder / "deterioration.yaml"
    document = yaml.safe_load(path.read_text())
    extra = dict(document["versions"][0]) | {"version": number}
    document["versions"].append(extra)
    path.write_text(yaml.safe_dump(document))


def test_a_version_added_to_the_file_is_learned_on_first_ask(tmp_path: Path) -> None:
    """learn() reads the folder again for an unknown version and updates the held dict in place."""
    folder = _copy_specs(tmp_path)
    clock = Clock()
    catalog = SpecCatalog(folder, clock=clock)
    held = catalog.specs
    assert not catalog.knows("deterioration", 9)
    _add_version(folder, 9)
    clock.now = 5.0
    assert catalog.learn("deterioration", 9)
    assert held["deterioration"].version(9).triton.model == "deterioration"


def test_reads_are_throttled_and_a_broken_folder_keeps_the_old_specs(tmp_path: Path) -> None:
    """Within the interval nothing is read; a spec that no longer parses keeps what was held."""
    folder = _copy_specs(tmp_path)
    clock = Clock()
    catalog = SpecCatalog(folder, clock=clock)
    _add_version(folder, 9)
    clock.now = 0.5
    assert not catalog.learn("deterioration", 9)  # read 0.5 s ago: not read again yet
    (folder / "deterioration.yaml").write_text("schema: medmesh.ModelSpec/2\nname: [")
    clock.now = 2.0
    assert not catalog.learn("deterioration", 9)
    assert catalog.last_error is not None
    assert catalog.knows("deterioration", 1)
