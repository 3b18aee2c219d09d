"""`medmesh logs NAME`: the components with a log in the stack's state folder, the last lines of
one, the lines written to it afterwards (also across a log moved aside on a restart), and the
command's answers for a known and an unknown name."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from medmesh_cli import logfiles
from medmesh_cli.logfiles import follow, log_files, tail
from medmesh_cli.main import app


def _state(root: Path) -> Path:
    """A state folder as `medmesh up` leaves it: services and Triton at the top, Kafka and
    Orthanc beside their data, with earlier runs' logs moved aside."""
    (root / "kafka").mkdir(parents=True)
    (root / "orthanc").mkdir()
    (root / "ingest.log").write_text("".join(f"ingest {i}\n" for i in range(100)))
    (root / "deterioration-v2.log").write_text("worker\n")
    (root / "triton.log").write_text("I1205 model ready\n")
    (root / "kafka" / "broker.log").write_text("[KafkaServer id=1] started\n")
    (root / "kafka" / "broker-123.log").write_text("an earlier run\n")
    (root / "orthanc" / "orthanc.log").write_text("orthanc up\n")
    (root / "spans.jsonl").write_text("{}\n")
    return root


def test_every_component_with_a_log_is_listed_by_name(tmp_path: Path) -> None:
    """Services and Triton by file name, Kafka and Orthanc by their nested logs; no spans file,
    no earlier run's log."""
    found = log_files(_state(tmp_path))

    assert list(found) == ["deterioration-v2", "ingest", "kafka", "orthanc", "triton"]
    assert found["kafka"] == tmp_path / "kafka" / "broker.log"
    assert found["orthanc"] == tmp_path / "orthanc" / "orthanc.log"


def test_tail_gives_the_last_lines_and_where_the_file_ended(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The last N lines, also when they span several blocks read from the end; 0 lines: none."""
    monkeypatch.setattr(logfiles, "_BLOCK", 7)  # several backward reads for a few lines
    path = _state(tmp_path) / "ingest.log"

    last, size = tail(path, 3)

    assert last == ["ingest 97\n", "ingest 98\n", "ingest 99\n"]
    assert size == path.stat().st_size
    assert tail(path, 500)[0] == path.read_text().splitlines(keepends=True)
    assert tail(path, 0) == ([], size)


def test_tail_keeps_an_unfinished_last_line(tmp_path: Path) -> None:
    """A last line still being written (no newline yet) is shown."""
    path = tmp_path / "x.log"
    path.write_text("one\ntwo\nthr")

    assert tail(path, 2)[0] == ["two\n", "thr"]


def test_follow_gives_lines_written_after_the_offset_once_complete(tmp_path: Path) -> None:
    """Lines appended after the tail are given as they are finished, not before."""
    path = tmp_path / "ingest.log"
    path.write_text("old\n")
    waits: list[float] = []
    lines = follow(path, path.stat().st_size, sleep=waits.append)
    with path.open("a") as log:
        log.write("new 1\nnew ")
    assert next(lines) == "new 1\n"
    with path.open("a") as log:
        log.write("2\n")
    assert next(lines) == "new 2\n"
    lines.close()


def test_follow_reads_a_log_started_afresh_from_its_start(tmp_path: Path) -> None:
    """A log moved aside and written anew (Kafka on a restart) is followed into the new file."""
    path = tmp_path / "broker.log"
    path.write_text("first run\n")
    lines = follow(path, path.stat().st_size, sleep=lambda _s: None)
    path.rename(tmp_path / "broker-1.log")
    path.write_text("second run\n")

    assert next(lines) == "second run\n"
    lines.close()


def test_follow_waits_while_nothing_is_written(tmp_path: Path) -> None:
    """At the end of the log the follower sleeps (polls) instead of ending."""
    path = tmp_path / "ingest.log"
    path.write_text("old\n")
    waits: list[float] = []

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        if len(waits) == 3:
            with path.open("a") as log:
                log.write("late\n")

    assert next(follow(path, path.stat().st_size, poll_s=0.5, sleep=sleep)) == "late\n"
    assert waits == [0.5, 0.5, 0.5]


def test_logs_command_prints_the_last_lines_of_a_known_name(tmp_path: Path) -> None:
    """`medmesh logs ingest -n 2` prints the log's last two lines as they are."""
    state = _state(tmp_path)

    result = CliRunner().invoke(app, ["logs", "ingest", "-n", "2", "--state-dir", str(state)])

    assert result.exit_code == 0, result.output
    assert result.output == "ingest 98\ningest 99\n"


def test_logs_command_reads_the_folder_medmesh_up_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without --state-dir it reads var/stack of the checkout (where `up` writes its logs)."""
    monkeypatch.setenv("MEDMESH_REPO_ROOT", str(tmp_path))
    _state(tmp_path / "var" / "stack")

    result = CliRunner().invoke(app, ["logs", "kafka"])

    assert result.exit_code == 0, result.output
    assert result.output == "[KafkaServer id=1] started\n"


def test_logs_command_names_the_logs_there_are_for_an_unknown_name(tmp_path: Path) -> None:
    """An unknown name exits 2 and lists the names that have logs."""
    state = _state(tmp_path)

    result = CliRunner().invoke(app, ["logs", "nope", "--state-dir", str(state)])

    assert result.exit_code == 2
    assert "deterioration-v2, ingest, kafka, orthanc, triton" in result.output
