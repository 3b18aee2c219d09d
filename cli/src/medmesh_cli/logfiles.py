"""The local stack's log files, for ``medmesh logs``: which components have one, the last lines
of one, and the lines written to it from then on.

Each service and Triton log to ``<state>/<name>.log``; Kafka and Orthanc keep theirs beside their
data (``kafka/broker.log``, ``orthanc/orthanc.log``), and move an earlier run's aside on a restart.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Generator
from pathlib import Path
from typing import BinaryIO

# Components whose log is not <state>/<name>.log.
NESTED_LOGS = {"kafka": Path("kafka") / "broker.log", "orthanc": Path("orthanc") / "orthanc.log"}
# How much of a file is read at a time when looking for its last lines from the end.
_BLOCK = 64 * 1024


def log_files(state_dir: Path) -> dict[str, Path]:
    """Every component with a log in ``state_dir``, by name (sorted), to the log's path."""
    found = {path.stem: path for path in state_dir.glob("*.log") if path.is_file()}
    for name, relative in NESTED_LOGS.items():
        if (state_dir / relative).is_file():
            found[name] = state_dir / relative
    return dict(sorted(found.items()))


def tail(path: Path, lines: int) -> tuple[list[str], int]:
    """The last ``lines`` complete or partial lines of ``path`` (each with its newline, when it
    has one) and the size of the file they were read at, where a follower goes on from. Reads
    from the end, so a long log costs no more than its tail."""
    with path.open("rb") as log:
        size = log.seek(0, os.SEEK_END)
        if lines <= 0:
            return [], size
        data = b""
        position = size
        # One newline more than lines wanted: the text after it holds exactly the lines wanted.
        while position > 0 and data.count(b"\n") <= lines:
            step = min(_BLOCK, position)
            position -= step
            log.seek(position)
            data = log.read(step) + data
    text = data.decode(errors="replace").splitlines(keepends=True)
    return text[-lines:], size


def follow(
    path: Path,
    offset: int,
    poll_s: float = 0.25,
    sleep: Callable[[float], None] = time.sleep,
) -> Generator[str, None, None]:
    """The lines written to ``path`` after byte ``offset``, as they are written, without end
    (the caller stops iterating; Ctrl-C for ``medmesh logs -f``). A line is given once it is
    complete (or its log is replaced). A log moved aside and started afresh (Kafka and Orthanc on
    a restart), or cut short, is read again from its start. The file is opened now, not on the
    first line asked for, so that a log replaced in between is noticed."""
    log = path.open("rb")
    log.seek(offset)
    return _follow(path, log, poll_s, sleep)


def _follow(
    path: Path, log: BinaryIO, poll_s: float, sleep: Callable[[float], None]
) -> Generator[str, None, None]:
    try:
        inode = os.fstat(log.fileno()).st_ino
        pending = b""
        while True:
            chunk = log.readline()
            if chunk:
                pending += chunk
                if pending.endswith(b"\n"):
                    yield pending.decode(errors="replace")
                    pending = b""
                continue
            try:
                now = path.stat()
            except FileNotFoundError:
                now = None  # moved aside, the new one not there yet
            if now is not None and (now.st_ino != inode or now.st_size < log.tell()):
                if pending:  # the old log's last line, never finished: shown as it is
                    yield pending.decode(errors="replace")
                    pending = b""
                log.close()
                log = path.open("rb")
                inode = os.fstat(log.fileno()).st_ino
                continue
            sleep(poll_s)
    finally:
        log.close()
