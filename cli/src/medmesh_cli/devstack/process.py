"""Child processes of the local stack: started in their own process group, logs to a file,
optionally echoed with a prefix, and stopped with SIGTERM then SIGKILL."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO


class ManagedProcess:
    """One child process whose output goes to ``log_path`` (and to stdout with a prefix)."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        echo: bool = False,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.env = dict(env) if env is not None else dict(os.environ)
        self.cwd = cwd
        self.echo = echo
        self._proc: subprocess.Popen[bytes] | None = None
        self._pump: threading.Thread | None = None

    @property
    def pid(self) -> int | None:
        """The child's pid while it runs."""
        return self._proc.pid if self._proc else None

    def start(self) -> None:
        """Start the child in a new session so signals to it never reach this process."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._proc = subprocess.Popen(
            self.argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=self.cwd,
            start_new_session=True,
            preexec_fn=_die_with_parent,  # noqa: PLW1509 -- only prctl, safe between fork and exec
        )
        self._pump = threading.Thread(
            target=self._copy_output, name=f"log-{self.name}", daemon=True
        )
        self._pump.start()

    def _copy_output(self) -> None:
        proc = self._proc
        if proc is None or proc.stdout is None:
            return
        with self.log_path.open("ab") as log:
            for line in proc.stdout:
                log.write(line)
                log.flush()
                if self.echo:
                    _echo(self.name, line, sys.stdout)

    def running(self) -> bool:
        """True while the child has not exited."""
        return self._proc is not None and self._proc.poll() is None

    def returncode(self) -> int | None:
        """The exit status once the child has exited."""
        return None if self._proc is None else self._proc.poll()

    def log_tail(self, lines: int = 40) -> str:
        """The last lines the child wrote, for error messages."""
        if not self.log_path.exists():
            return "(no output)"
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def signal(self, sig: int) -> None:
        """Send a signal to the child's whole process group."""
        if self._proc is not None and self._proc.poll() is None:
            try:
                os.killpg(self._proc.pid, sig)
            except ProcessLookupError:
                return

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM, wait up to ``grace_s``, then SIGKILL; waits for the output pump to finish."""
        if self._proc is None:
            return
        self.signal(signal.SIGTERM)
        try:
            self._proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            self._proc.wait(timeout=grace_s)
        if self._pump is not None:
            self._pump.join(timeout=2)


def _die_with_parent() -> None:
    """Ask Linux to SIGTERM this child when the process that started it dies (even by kill -9),
    so no broker or service outlives `medmesh up` or a crashed test session."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGTERM)


def _echo(name: str, line: bytes, out: IO[str]) -> None:
    out.write(f"{name:>10} | {line.decode(errors='replace')}")
    out.flush()


def wait_until(
    what: str, check: Callable[[], bool], timeout_s: float, interval_s: float = 0.25
) -> None:
    """Poll ``check()`` until it returns True; raise TimeoutError naming what was awaited."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(interval_s)
    raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}")
