"""py-spy flame graphs of the running medmesh processes during one bench level (issue 17).

``py-spy record --pid <pid> --format flamegraph --duration <s> --nonblocking`` per process, all
started together and waited for together: ``--nonblocking`` samples without pausing the process,
so the profiled level's latencies are not the profiler's. Needs ptrace rights (root, or
kernel.yama.ptrace_scope 0); a process py-spy cannot read fails the run with its message.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Profile:
    """One running py-spy recorder."""

    name: str
    svg: Path
    process: subprocess.Popen[bytes]


def py_spy() -> str:
    """The py-spy executable (the dev dependency beside this Python, else on PATH)."""
    beside = Path(sys.executable).parent / "py-spy"
    found = str(beside) if beside.exists() else shutil.which("py-spy")
    if found is None:
        raise RuntimeError("py-spy is not installed: uv sync (it is a dev dependency)")
    return found


def record_argv(executable: str, pid: int, duration_s: int, svg: Path) -> list[str]:
    """The py-spy command that writes one process's flame graph."""
    return [
        executable,
        "record",
        "--pid",
        str(pid),
        "--format",
        "flamegraph",
        "--duration",
        str(duration_s),
        # 50 Hz: a recorder per service shares the same two cores as the services it samples.
        "--rate",
        "50",
        "--nonblocking",
        "-o",
        str(svg),
    ]


def start_profiles(pids: Mapping[str, int], duration_s: int, folder: Path) -> list[Profile]:
    """Start recording every named process for ``duration_s`` into ``folder/flame-<name>.svg``."""
    folder.mkdir(parents=True, exist_ok=True)
    executable = py_spy()
    profiles: list[Profile] = []
    try:
        for name, pid in pids.items():
            svg = folder / f"flame-{name}.svg"
            # The recorder writes to its own copy of the descriptor: this one closes at once.
            with (folder / f"flame-{name}.log").open("wb") as log:
                process = subprocess.Popen(
                    record_argv(executable, pid, duration_s, svg),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            profiles.append(Profile(name, svg, process))
    except BaseException:
        _stop(profiles)  # no recorder left running when a later one cannot start
        raise
    return profiles


def _stop(profiles: list[Profile]) -> None:
    for profile in profiles:
        if profile.process.poll() is None:
            profile.process.kill()
            profile.process.wait()


def finish_profiles(profiles: list[Profile], timeout_s: float = 120.0) -> list[Path]:
    """Wait for the recorders; the flame graphs written (raises naming any that failed)."""
    failed = []
    try:
        codes = [profile.process.wait(timeout=timeout_s) for profile in profiles]
    finally:
        _stop(profiles)  # a recorder past its timeout is not left sampling
    for profile, code in zip(profiles, codes, strict=True):
        if code != 0 or not profile.svg.exists():
            log = profile.svg.with_suffix(".log")
            detail = log.read_text(errors="replace")[-400:] if log.exists() else ""
            failed.append(f"{profile.name} (exit {code}): {detail.strip()}")
    if failed:
        raise RuntimeError("py-spy could not profile: " + "; ".join(failed))
    return [p.svg for p in profiles]
