"""Where the console's browser test finds chromium, and what it says when there is none."""

from __future__ import annotations

from pathlib import Path

import pytest

from medmesh_cli.devstack import chromium
from medmesh_cli.devstack.chromium import ChromiumMissingError, chromium_binary


def test_the_variable_names_the_executable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """MEDMESH_CHROMIUM_BINARY wins over the Debian paths."""
    binary = tmp_path / "chromium"
    binary.write_text("")
    monkeypatch.setenv(chromium.BINARY_VARIABLE, str(binary))
    assert chromium_binary() == binary


def test_a_missing_chromium_says_how_to_get_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without an executable the error names the Debian package and make deps."""
    monkeypatch.delenv(chromium.BINARY_VARIABLE, raising=False)
    monkeypatch.setattr(chromium, "BINARY_CANDIDATES", (tmp_path / "none",))
    with pytest.raises(
        ChromiumMissingError, match="apt-get install -y --no-install-recommends chromium"
    ):
        chromium_binary()
    monkeypatch.setenv(chromium.BINARY_VARIABLE, str(tmp_path / "gone"))
    with pytest.raises(ChromiumMissingError, match="is not a file"):
        chromium_binary()
