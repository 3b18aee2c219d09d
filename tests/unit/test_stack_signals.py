"""The local stack stops cleanly: SIGINT or SIGTERM to `medmesh up` or to its process group stops
every child within 15 s, and no child outlives its supervisor (issue 16, item 7).

The supervisors here are real processes running the real `up` command and `Stack.stop`; only
what would start Kafka, Triton and the services is replaced by small Python children, some of
which ignore SIGTERM (as a service stuck in its graceful shutdown does).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from medmesh_cli.devstack import stack as stack_module
from medmesh_cli.devstack.process import ManagedProcess
from medmesh_cli.main import app

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux signals")

STOP_LIMIT_S = 15.0
SLEEPER = "print('ready', flush=True); import time; time.sleep(60)"
IGNORER = (
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    "print('ready', flush=True); time.sleep(60)"
)

# A supervisor: `medmesh up` with Stack._start_all replaced by children of the kinds asked for
# (argv[2], JSON: services, kafka, triton -> "sleeper" | "ignorer"); Triton's stand-in is started
# like tritonserver (plain Popen, in the supervisor's process group). argv[3] "start": `up` is
# still starting when signalled (start blocks); "serve": start returns and `up` serves.
UP_SUPERVISOR = textwrap.dedent(
    """
    import asyncio, json, subprocess, sys, time
    from pathlib import Path

    import medmesh_cli.main as main
    from medmesh_cli.devstack import stack as stack_module
    from medmesh_cli.devstack.process import ManagedProcess

    out = Path(sys.argv[1])
    kinds = json.loads(sys.argv[2])
    phase = sys.argv[3]
    code = {"sleeper": %(sleeper)r, "ignorer": %(ignorer)r}
    # Short graces keep the tests quick; test_default_graces_fit_the_limit checks the real ones.
    stack_module.SERVICES_STOP_GRACE_S = 1.0
    stack_module.INFRA_STOP_GRACE_S = 1.0

    def record(name, pid):
        with (out / "pids.jsonl").open("a") as f:
            f.write(json.dumps({"name": name, "pid": pid}) + "\\n")

    def child(name, kind):
        process = ManagedProcess(name, [sys.executable, "-c", code[kind]], out / f"{name}.log")
        process.start()
        record(name, process.pid)
        return process

    def fake_start_all(self, timeout_s):
        record("supervisor", __import__("os").getpid())
        for index, kind in enumerate(kinds["services"]):
            name = f"worker-v{index + 1}"
            self.services[name] = child(name, kind)
        self.kafka._process = child("kafka", kinds["kafka"])
        log = (out / "triton.log").open("ab")
        self.triton._process = subprocess.Popen(
            [sys.executable, "-c", code[kinds["triton"]]], stdout=log, stderr=log
        )
        record("triton", self.triton._process.pid)
        if phase == "start":
            while True:  # a slow start (Maven, Triton loading models): still in Stack.start
                time.sleep(0.05)

    async def watch_reports(bootstrap):
        # Like aiokafka's consumer: leaving the group on stop needs the connection's reader
        # task to read the answer; without it the request times out (40 s in aiokafka).
        answers = asyncio.Queue()
        requests = asyncio.Queue()

        async def connection():
            while True:
                await requests.get()
                await asyncio.sleep(0.05)
                answers.put_nowait("left")

        reader = asyncio.create_task(connection())
        (out / "serving").write_text("yes")
        try:
            await asyncio.Event().wait()
        finally:
            requests.put_nowait("leave group")
            await asyncio.wait_for(answers.get(), timeout=40)
            reader.cancel()

    stack_module.Stack._start_all = fake_start_all
    stack_module.Stack.reconcile = lambda self: []
    main._watch_reports = watch_reports
    main.app(["up", "--no-logs"])
    """
) % {"sleeper": SLEEPER, "ignorer": IGNORER}

# A supervisor that only starts two ManagedProcesses and waits.
PLAIN_SUPERVISOR = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    from medmesh_cli.devstack.process import ManagedProcess

    out = Path(sys.argv[1])
    code = {"sleeper": %(sleeper)r, "ignorer": %(ignorer)r}
    started = []

    def start(name, kind):
        process = ManagedProcess(name, [sys.executable, "-c", code[kind]], out / f"{name}.log")
        process.start()
        started.append(process)
        with (out / "pids.jsonl").open("a") as f:
            f.write(json.dumps({"name": name, "pid": process.pid}) + "\\n")

    start("sleeper", "sleeper")
    start("ignorer", "ignorer")
    while True:
        time.sleep(1)
    """
) % {"sleeper": SLEEPER, "ignorer": IGNORER}


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting to be reaped counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _wait_gone(pids: dict[str, int], limit_s: float) -> list[str]:
    """Wait up to ``limit_s`` for every pid to be gone; the names of those still running."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        left = [name for name, pid in pids.items() if _alive(pid)]
        if not left:
            return []
        time.sleep(0.1)
    return [name for name, pid in pids.items() if _alive(pid)]


def _wait_for(what: str, check: object, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if callable(check) and check():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


class Supervisor:
    """A supervisor process in its own session, and the children it reported."""

    def __init__(self, tmp_path: Path, script: str, *args: str) -> None:
        self.out = tmp_path / "out"
        self.out.mkdir()
        path = tmp_path / "medmesh-supervisor.py"  # `down` checks the name (pid reuse)
        path.write_text(script)
        env = dict(os.environ, MEDMESH_REPO_ROOT=str(tmp_path), MEDMESH_GPU_COUNT="0")
        self.log = (tmp_path / "supervisor.log").open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, str(path), str(self.out), *args],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # its own process group, as `make run` is in a terminal
        )
        self.tmp_path = tmp_path

    def children(self) -> dict[str, int]:
        """Every child the supervisor started, by name."""
        pids_file = self.out / "pids.jsonl"
        if not pids_file.exists():
            return {}
        rows = [json.loads(line) for line in pids_file.read_text().splitlines() if line]
        return {r["name"]: r["pid"] for r in rows if r["name"] != "supervisor"}

    def wait_children_ready(self, count: int) -> dict[str, int]:
        """Wait until ``count`` children run and have set up their signal handling."""

        def ready() -> bool:
            children = self.children()
            logs = [self.out / f"{name}.log" for name in children]
            return len(children) == count and all(
                log.exists() and "ready" in log.read_text() for log in logs
            )

        _wait_for(f"{count} ready children", ready)
        return self.children()

    def output(self) -> str:
        """What the supervisor printed."""
        self.log.flush()
        return (self.tmp_path / "supervisor.log").read_text(errors="replace")

    def cleanup(self) -> None:
        """Kill whatever this test started and is still running."""
        for pid in [*self.children().values(), self.proc.pid]:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait(timeout=5)
        self.log.close()


@pytest.fixture
def supervisors(tmp_path: Path) -> Iterator[list[Supervisor]]:
    """Supervisors started by a test; everything they left running is killed afterwards."""
    started: list[Supervisor] = []
    yield started
    for supervisor in started:
        supervisor.cleanup()


def _up(
    tmp_path: Path, started: list[Supervisor], phase: str, services: list[str], infra: str
) -> Supervisor:
    kinds = {"services": services, "kafka": infra, "triton": infra}
    supervisor = Supervisor(tmp_path, UP_SUPERVISOR, json.dumps(kinds), phase)
    started.append(supervisor)
    return supervisor


def test_group_sigterm_while_starting_stops_every_child(
    tmp_path: Path, supervisors: list[Supervisor]
) -> None:
    """SIGTERM to the process group while `medmesh up` is still starting stops every child."""
    supervisor = _up(tmp_path, supervisors, "start", ["sleeper", "ignorer", "ignorer"], "ignorer")
    children = supervisor.wait_children_ready(5)
    os.killpg(supervisor.proc.pid, signal.SIGTERM)
    left = _wait_gone(children, STOP_LIMIT_S)
    assert left == [], f"still running {STOP_LIMIT_S:.0f}s after SIGTERM: {left}"
    assert supervisor.proc.wait(timeout=5) == 0, supervisor.output()


def test_sigint_to_up_alone_stops_every_child_despite_more_signals(
    tmp_path: Path, supervisors: list[Supervisor]
) -> None:
    """SIGINT to `medmesh up` alone while serving stops every child within 15 s, and further
    SIGINTs and SIGTERMs during the stop do not cut it short."""
    supervisor = _up(tmp_path, supervisors, "serve", ["ignorer", "ignorer", "ignorer"], "sleeper")
    children = supervisor.wait_children_ready(5)
    _wait_for("up to serve", (supervisor.out / "serving").exists)
    os.kill(supervisor.proc.pid, signal.SIGINT)
    time.sleep(0.5)  # the stop is under way: the ignoring workers hold it for their grace
    for again in (signal.SIGINT, signal.SIGTERM, signal.SIGINT):
        os.kill(supervisor.proc.pid, again)
        time.sleep(0.1)
    left = _wait_gone(children, STOP_LIMIT_S - 0.8)
    assert left == [], f"still running {STOP_LIMIT_S:.0f}s after SIGINT: {left}"
    assert supervisor.proc.wait(timeout=5) == 0, supervisor.output()


def test_down_stops_a_stack_that_is_still_starting(
    tmp_path: Path, supervisors: list[Supervisor], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`medmesh down` stops a `medmesh up` that is still starting, children included."""
    supervisor = _up(tmp_path, supervisors, "start", ["sleeper", "ignorer"], "sleeper")
    children = supervisor.wait_children_ready(4)
    monkeypatch.setenv("MEDMESH_REPO_ROOT", str(tmp_path))
    result = CliRunner().invoke(app, ["down"])
    assert result.exit_code == 0, result.output
    assert "medmesh stopped" in result.output
    assert _wait_gone(children, 1.0) == []
    assert supervisor.proc.wait(timeout=5) == 0, supervisor.output()


def test_children_die_with_a_killed_supervisor(
    tmp_path: Path, supervisors: list[Supervisor]
) -> None:
    """Children of a supervisor killed with SIGKILL die with it, even those ignoring SIGTERM."""
    supervisor = Supervisor(tmp_path, PLAIN_SUPERVISOR)
    supervisors.append(supervisor)
    children = supervisor.wait_children_ready(2)
    os.kill(supervisor.proc.pid, signal.SIGKILL)
    supervisor.proc.wait(timeout=5)
    assert _wait_gone(children, 5.0) == []


def test_child_started_from_a_thread_outlives_the_thread(tmp_path: Path) -> None:
    """A child started from a thread that then ends keeps running (the parent-death signal
    follows the process, not the thread that forked the child)."""
    process = ManagedProcess("t", [sys.executable, "-c", SLEEPER], tmp_path / "t.log")
    thread = threading.Thread(target=process.start)
    thread.start()
    thread.join()
    try:
        _wait_for("the child's output", lambda: "ready" in process.log_tail())
        time.sleep(0.3)
        assert process.running()
    finally:
        process.stop(grace_s=1)
    assert not process.running()


def test_stop_kills_what_is_left_in_the_childs_group(tmp_path: Path) -> None:
    """stop() also kills a grandchild that ignores SIGTERM after the child itself has exited."""
    script = f'{sys.executable} -c "{IGNORER}" & echo grandchild $!; sleep 60'
    process = ManagedProcess("g", ["sh", "-c", script], tmp_path / "g.log")
    process.start()

    def grandchild() -> int | None:
        for line in process.log_tail().splitlines():
            if line.startswith("grandchild "):
                return int(line.split()[1])
        return None

    _wait_for("the grandchild's pid", lambda: grandchild() is not None)
    pid = grandchild()
    assert pid is not None
    try:
        time.sleep(0.5)  # let it set up its SIGTERM handling
        process.stop(grace_s=1)
        assert _wait_gone({"grandchild": pid}, 3.0) == []
    finally:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_default_graces_fit_the_limit() -> None:
    """Services' grace, then Triton's and Kafka's together, plus SIGKILL waits fit in 15 s."""
    worst = stack_module.SERVICES_STOP_GRACE_S + stack_module.INFRA_STOP_GRACE_S
    assert worst + 2 * 1.0 <= STOP_LIMIT_S - 1.0
