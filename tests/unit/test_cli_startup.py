"""How `medmesh up` shows the stack starting: one row per component with its state and seconds
(or, with --logs, one line per step), fed by Stack's on_step; no component output by default."""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from typer.testing import CliRunner

from medmesh_cli import main
from medmesh_cli.devstack.stack import READY, STARTING, WAITING, Stack
from medmesh_cli.startup import StartupLines, StartupProgress


def _console() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, width=100, force_terminal=False, color_system=None), out


def test_progress_shows_one_row_per_component_in_the_order_announced() -> None:
    """Rows come in the order of the waiting announcements; each shows its last state, a
    ready one its note, a started one its seconds, one never started none."""
    console, out = _console()
    with StartupProgress(console) as progress:
        for name in ("kafka", "studies", "triton", "ingest"):
            progress.step(name, WAITING)
        progress.step("triton", STARTING)
        progress.step("kafka", STARTING)
        progress.step("kafka", "fetching the broker jars (Maven, first run only)")
        progress.step("kafka", READY)
        progress.step("studies", STARTING)
        progress.step("studies", READY, "2 seeded")

    rows = [line.split() for line in out.getvalue().splitlines() if line.strip()]
    assert [row[1] for row in rows] == ["kafka", "studies", "triton", "ingest"]
    assert rows[0][2] == "ready"
    assert re.fullmatch(r"\d+\.\d", rows[0][3])
    assert rows[1][2:5] == ["ready", "(2", "seeded)"]
    assert rows[2][2] == "starting"
    assert rows[3][2:] == ["waiting"]


def test_progress_shows_a_detail_of_a_long_step() -> None:
    """A state that is not waiting/starting/ready is shown as the step's detail."""
    console, out = _console()
    with StartupProgress(console) as progress:
        progress.step("kafka", WAITING)
        progress.step("kafka", STARTING)
        progress.step("kafka", "fetching the broker jars (Maven, first run only)")

    assert "fetching the broker jars (Maven, first run only)" in out.getvalue()


def test_lines_print_each_step_but_waiting() -> None:
    """With echoed output: a line per starting, detail and ready step, none for waiting."""
    console, out = _console()
    with StartupLines(console) as lines:
        lines.step("kafka", WAITING)
        lines.step("kafka", STARTING)
        lines.step("kafka", READY)
        lines.step("studies", READY, "2 seeded")

    printed = out.getvalue().splitlines()
    assert printed[0] == "medmesh kafka: starting"
    assert re.fullmatch(r"medmesh kafka: ready in \d+\.\d s", printed[1])
    assert printed[2].startswith("medmesh studies: ready (2 seeded) in ")
    assert len(printed) == 3


@pytest.mark.parametrize(
    ("flag", "row"), [([], r"✓ orthanc\s+ready"), (["--logs"], r"orthanc: ready")]
)
def test_up_shows_the_start_as_progress_then_says_it_is_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flag: list[str], row: str
) -> None:
    """`medmesh up` shows the steps Stack reports (rows by default, lines with --logs), then
    'medmesh is up' naming `medmesh logs`."""
    monkeypatch.setenv("MEDMESH_REPO_ROOT", str(tmp_path))
    echo: list[bool] = []

    def start_all(self: Stack, timeout_s: float) -> None:
        echo.append(self.config.echo)
        for name in ("kafka", "orthanc"):
            self._step(name, WAITING)
        for name in ("kafka", "orthanc"):
            self._step(name, STARTING)
            self._step(name, READY)

    async def serve(*_args: Any) -> None:
        return None

    monkeypatch.setattr(Stack, "_start_all", start_all)
    monkeypatch.setattr(Stack, "stop", lambda self: None)
    monkeypatch.setattr(main, "_serve", serve)
    monkeypatch.setattr(main, "console", Console(width=100, color_system=None))

    result = CliRunner().invoke(main.app, ["up", *flag])

    assert result.exit_code == 0, result.output
    assert re.search(row, result.output), result.output
    assert "medmesh is up" in result.output
    assert "medmesh logs NAME" in result.output
    assert echo == [flag == ["--logs"]]


def test_a_part_that_does_not_start_is_told_in_a_line_not_a_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stack.start's error (its message quotes log lines with brackets) is printed as it is,
    `up` exits 1 after stopping, and the rows show how far the start got."""
    monkeypatch.setenv("MEDMESH_REPO_ROOT", str(tmp_path))
    stopped: list[bool] = []

    def start_all(self: Stack, timeout_s: float) -> None:
        self._step("kafka", WAITING)
        self._step("kafka", STARTING)
        raise RuntimeError("Kafka: port 9092 is already in use\n[KafkaServer id=1] shutting down")

    monkeypatch.setattr(Stack, "_start_all", start_all)
    monkeypatch.setattr(Stack, "stop", lambda self: stopped.append(True))
    monkeypatch.setattr(main, "console", Console(width=100, color_system=None))

    result = CliRunner().invoke(main.app, ["up"])

    assert result.exit_code == 1, result.output
    assert "medmesh: Kafka: port 9092 is already in use" in result.output
    assert "[KafkaServer id=1] shutting down" in result.output
    assert re.search(r"kafka\s+starting", result.output)
    assert isinstance(result.exception, SystemExit)  # typer.Exit(1), not the RuntimeError
    assert stopped
    assert "medmesh is up" not in result.output
