"""The bench's py-spy recorders: none is left running when waiting for them times out."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from medmesh_cli.bench import profile


def test_recorders_past_their_timeout_are_stopped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """finish_profiles raises when a recorder overruns its timeout, and kills every recorder
    still running instead of leaving it sampling the services."""
    recorder = tmp_path / "fake-py-spy"
    recorder.write_text("#!/bin/sh\nexec sleep 30\n")
    recorder.chmod(0o755)
    monkeypatch.setattr(profile, "py_spy", lambda: str(recorder))
    started = profile.start_profiles({"ingest": 1, "router": 2}, 30, tmp_path / "flames")
    with pytest.raises(subprocess.TimeoutExpired):
        profile.finish_profiles(started, timeout_s=0.2)
    assert [p.process.poll() for p in started] == [-9, -9]
