"""Child processes of the local stack: each in its own session (a signal to a terminal's or a
supervisor's process group reaches only `medmesh up`, which stops its children in order), logs to
a file, optionally echoed with a prefix, stopped with SIGTERM then SIGKILL, and killed by Linux
if the process that started them dies without stopping them."""

from __future__ import annotations

import ctypes
import functools
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import IO, Any

# After SIGKILL, how long to wait for a process (and then its output pump) to be gone.
KILL_WAIT_S = 2.0
PUMP_WAIT_S = 2.0


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
        """Start the child in a new session so signals to this process's group never reach it;
        Linux kills it (SIGKILL) if this process dies without stopping it."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        parent = os.getpid()

        def launch() -> subprocess.Popen[bytes]:
            return subprocess.Popen(
                self.argv,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,
                # only prctl, getppid and kill run between fork and exec (libc is resolved)
                preexec_fn=functools.partial(_die_with_parent, parent),  # noqa: PLW1509
            )

        self._proc = _spawn(launch)
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
        """SIGTERM, wait up to ``grace_s``, then SIGKILL; waits (bounded) for the output pump."""
        stop_all([self], grace_s)

    def _wait(self, deadline: float) -> bool:
        """Wait until the child has exited or ``deadline`` (monotonic) passed; whether it exited."""
        if self._proc is None:
            return True
        try:
            self._proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            return False
        return True

    def _kill_group(self) -> None:
        """SIGKILL whatever is left in the child's process group (its own children), also after
        the child itself has exited: the group id stays reserved while a member lives."""
        if self._proc is None:
            return
        try:
            os.killpg(self._proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            return


def stop_all(processes: Sequence[ManagedProcess], grace_s: float) -> None:
    """Stop processes together: SIGTERM to every group at once, SIGKILL to every group after
    ``grace_s`` (at once if its leader is already gone, for what it left behind), then wait for
    the output pumps. Takes at most ``grace_s + KILL_WAIT_S + PUMP_WAIT_S``; never raises for a
    process that will not die (a process in uninterruptible sleep is left to the kernel)."""
    running = [p for p in processes if p.running()]
    for process in running:
        process.signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for process in running:
        process._wait(deadline)
    for process in running:
        process._kill_group()
    deadline = time.monotonic() + KILL_WAIT_S
    for process in running:
        process._wait(deadline)
    deadline = time.monotonic() + PUMP_WAIT_S
    for process in processes:
        if process._pump is not None:
            process._pump.join(timeout=max(0.0, deadline - time.monotonic()))


def _load_prctl() -> Any:
    """libc's prctl, resolved once in the parent (dlopen between fork and exec could deadlock);
    None where there is none (not Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _load_prctl()
_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent_pid: int) -> None:
    """In the child, between fork and exec: ask Linux to SIGKILL it when the process that started
    it dies (by kill -9 too), so no broker or service outlives `medmesh up` or a test session.

    SIGKILL, not SIGTERM: this fires only when the supervisor is gone without having stopped its
    children, so nobody is left to wait for a graceful stop or to escalate; a worker whose
    Triton and Kafka are gone can spend minutes in its graceful shutdown (issue 16). The stack's
    state is disposable (Kafka is formatted afresh on every start) and the services are safe
    across kill -9. If the parent died before prctl took effect, the child ends itself now."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, int(signal.SIGKILL))
    if os.getppid() != parent_pid:
        os.kill(os.getpid(), signal.SIGKILL)


class _Spawner:
    """Starts children from one thread that lives as long as the process.

    Linux sends the parent-death signal when the *thread* that forked the child ends, not the
    process: a child started from a short-lived thread (``asyncio.to_thread``, a start-up thread)
    would be killed with that thread. The main thread lives as long as the process, so children
    are started directly there and from this spawner thread otherwise."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: queue.SimpleQueue[
            tuple[Callable[[], subprocess.Popen[bytes]], Future[subprocess.Popen[bytes]]]
        ] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()

    def spawn(self, start: Callable[[], subprocess.Popen[bytes]]) -> subprocess.Popen[bytes]:
        """``start()`` on a thread that lives as long as this process; its result."""
        if threading.current_thread() is threading.main_thread():
            return start()
        future: Future[subprocess.Popen[bytes]] = Future()
        if self._pid != os.getpid():  # a forked copy of this process: the thread stayed behind
            self._lock, self._requests, self._thread = threading.Lock(), queue.SimpleQueue(), None
            self._pid = os.getpid()
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._serve, name="medmesh-spawner", daemon=True
                )
                self._thread.start()
        self._requests.put((start, future))
        return future.result()

    def _serve(self) -> None:
        while True:
            start, future = self._requests.get()
            try:
                future.set_result(start())
            except BaseException as exc:  # noqa: BLE001 -- handed to the asking thread, which raises it
                future.set_exception(exc)


_SPAWNER = _Spawner()


def _spawn(start: Callable[[], subprocess.Popen[bytes]]) -> subprocess.Popen[bytes]:
    return _SPAWNER.spawn(start)


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
