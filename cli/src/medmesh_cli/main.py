"""The ``medmesh`` command: run the local stack, send FHIR, watch reports."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from aiokafka import AIOKafkaConsumer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from medmesh_cli.bench.command import bench
from medmesh_cli.bench.pipeline import load_template, run_load, vitals_events
from medmesh_cli.bench.stats import markdown_table
from medmesh_cli.devstack.overlay import with_overlay
from medmesh_cli.devstack.paths import repo_root, run_dir
from medmesh_cli.devstack.stack import READY, Stack, StackConfig, ready_summary
from medmesh_cli.devstack.studies import DEMO_STUDIES, imaging_study
from medmesh_cli.logfiles import follow as follow_log
from medmesh_cli.logfiles import log_files, tail
from medmesh_cli.models import models_app
from medmesh_cli.ops import commands as ops
from medmesh_cli.reports import summarize
from medmesh_cli.startup import StartupLines, StartupProgress
from medmesh_contracts import headers as h
from medmesh_contracts import topics

app = typer.Typer(
    help="medmesh: FHIR in, AI models on Triton, FHIR DiagnosticReports out.", no_args_is_help=True
)
console = Console()
PID_FILE = "medmesh-up.pid"
DEFAULT_INGEST = "http://127.0.0.1:8080"


def sample_events() -> list[Path]:
    """The sample events sent by ``up --demo``: the vitals fixtures the tests also use, so the
    demo shows exactly what is tested (tests/fixtures/fhir/EXPECTED.md has the arithmetic), then
    the two R4B ECG fixtures (sinus rhythm, AF-like; tests/fixtures/fhir/make_ecg_fixtures.py)."""
    fixtures = repo_root() / "tests" / "fixtures" / "fhir"
    vitals = sorted(fixtures.glob("vitals-bundle-*.json"))
    return [*vitals, fixtures / "ecg-sinus.json", fixtures / "ecg-af.json"]


@app.command()
def up(
    demo: Annotated[
        bool, typer.Option(help="send the sample events and print each report")
    ] = False,
    logs: Annotated[
        bool,
        typer.Option(
            help="echo every component's output with its name as a prefix, instead of showing "
            "progress (the logs are in var/stack either way: `medmesh logs NAME`)"
        ),
    ] = False,
    topology: Annotated[
        str,
        typer.Option(
            help="services: one process per service; monolith: the four stages in one process "
            "(Kafka only at the edges), for comparison"
        ),
    ] = "services",
    overlay: Annotated[
        Path | None,
        typer.Option(help="also serve the model versions of an overlay (deploy/drills/...)"),
    ] = None,
) -> None:
    """Start Kafka, Triton and the four services on loopback; Ctrl-C or `medmesh down` stops all."""
    if topology not in ("services", "monolith"):
        raise typer.BadParameter("choose services or monolith", param_hint="--topology")
    config = StackConfig(echo=logs, topology="monolith" if topology == "monolith" else "services")
    if overlay is not None:
        config = with_overlay(config, overlay)
    pid_file = config.state_dir / PID_FILE
    other = _running_up_pid(pid_file)
    if other is not None:
        console.print(f"[bold red]medmesh: a stack is already running (pid {other})[/]")
        raise typer.Exit(1)
    # Before anything starts: a signal that arrives while Kafka or Triton is still starting
    # must stop what was started, not kill this process and orphan its children.
    signals = StopSignals()
    signals.install()
    stack: Stack | None = None
    failed = False
    try:
        config.state_dir.mkdir(parents=True, exist_ok=True)
        pid_file.write_text(str(os.getpid()))  # `medmesh down` works from the start on
        stack = Stack(config)
        started = time.monotonic()
        _start(stack, logs)
        console.print(
            f"[bold green]medmesh is up[/] in {time.monotonic() - started:.1f}s: "
            f"{ready_summary(config)}",
            soft_wrap=True,
        )
        asyncio.run(_serve(stack, demo, signals))
    except KeyboardInterrupt:
        pass  # a signal while starting (or outside the serve loop): stop below
    except (ProcessExitedError, StartFailedError) as exc:
        # escaped: the message quotes log lines, whose brackets are not rich markup
        console.print(f"[bold red]medmesh:[/] {escape(str(exc))}", highlight=False)
        failed = True
    finally:
        signals.stopping = True  # from here on, signals cannot cut the stop short
        if stack is not None:
            console.print("[bold]medmesh[/] stopping ...")
            stack.stop()
        if _pid_in(pid_file) == os.getpid():
            pid_file.unlink(missing_ok=True)
        signals.restore()
        console.print("[bold]medmesh[/] stopped")
    if failed:
        raise typer.Exit(1)


def _start(stack: Stack, echoed: bool) -> None:
    """Start the stack, showing its steps as progress rows (as plain lines when every
    component's output is ``echoed``: a live display and echoed output would overwrite each
    other). StartFailedError with what did not start and why."""
    display = StartupLines(console) if echoed else StartupProgress(console)

    def on_step(component: str, state: str) -> None:
        seeded = component == "studies" and state == READY
        display.step(component, state, f"{len(stack.seeded_studies)} seeded" if seeded else "")

    stack.on_step = on_step
    console.print("[bold]medmesh[/] starting Kafka, Orthanc, Triton and the services ...")
    with display:
        try:
            stack.start()
        except RuntimeError as exc:  # what did not start and why (log tails), not a traceback
            raise StartFailedError(str(exc)) from exc
        finally:
            stack.on_step = None  # workers a hot deploy starts later are reported by _reconcile


class StopSignals:
    """How `medmesh up` takes SIGINT, SIGTERM and SIGHUP (Ctrl-C, a supervisor or CI runner,
    `medmesh down`, a closed terminal): the first ends the serve loop (``on_stop``) or, while the
    stack is still starting, raises KeyboardInterrupt in the main thread; either way `up` goes on
    into ``Stack.stop``. They are taken over before anything starts. Once stopping,
    signals are ignored: a second Ctrl-C, a repeated SIGTERM, or make passing the group's
    SIGTERM on to its child cannot cut the stop short and orphan the children (they run in
    their own sessions and get no signal of their own). The stop is bounded (``Stack.stop``), so
    nothing is lost by waiting for it."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self) -> None:
        self.stopping = False
        # Set while the serve loop runs: the first signal calls it instead of raising, so that
        # the loop winds down in order (a KeyboardInterrupt through asyncio.run cancels every
        # task at once, aiokafka's connection readers included, and the report consumer then
        # waits 40 s for the answer to its LeaveGroup request before anything is stopped).
        self.on_stop: Callable[[], None] | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        """Take over the three signals (from the main thread)."""
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        """Give the signals back their previous handlers."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def _handle(self, _signum: int, _frame: object) -> None:
        if self.stopping:
            return
        self.stopping = True
        if self.on_stop is not None:
            self.on_stop()
            return
        raise KeyboardInterrupt


def _pid_in(pid_file: Path) -> int | None:
    """The pid a pid file names; None when there is none or it does not read."""
    try:
        return int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return None


def _running_up_pid(pid_file: Path) -> int | None:
    """The pid of the `medmesh up` the pid file names, while it runs; None for a missing or stale
    pid file (its process gone, or the pid reused by a program that is not medmesh)."""
    pid = _pid_in(pid_file)
    if pid is None or pid == os.getpid():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return pid
    cmdline = Path(f"/proc/{pid}/cmdline")
    if cmdline.exists():
        try:
            if b"medmesh" not in cmdline.read_bytes():
                return None
        except OSError:
            return pid
    return pid


class ProcessExitedError(RuntimeError):
    """A process of the stack exited while the stack was up."""


class StartFailedError(RuntimeError):
    """A part of the stack did not start (Stack.start has stopped the rest)."""


async def _serve(stack: Stack, demo: bool, signals: StopSignals) -> None:
    """Print reports, send the demo events, notice a process that exits and take in new model
    versions, until a stop signal (see ``StopSignals.on_stop``); then wind down in order."""
    config = stack.config
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def request_stop() -> None:  # runs in the signal handler: only schedule, wake the loop
        loop.call_soon_threadsafe(stop.set)

    signals.on_stop = request_stop
    stopped = asyncio.create_task(stop.wait())
    watcher = asyncio.create_task(_watch_reports(config.bootstrap))
    sender = (
        asyncio.create_task(_send_demo(config.ingest_url, demo_studies(stack))) if demo else None
    )
    tasks = {stopped, watcher, *([sender] if sender is not None else [])}
    refused = ""
    tick = 0
    try:
        while not stop.is_set() and not watcher.done():
            if sender is not None and sender.done():
                sender.result()  # a demo send that failed ends `up`, as it always did
                sender = None
            dead = stack.exited()
            if dead:
                raise ProcessExitedError(
                    f"{', '.join(dead)} exited; stopping the stack (logs in {config.state_dir})"
                )
            tick += 1
            if tick % RECONCILE_EVERY_TICKS == 0:
                refused = _reconcile(stack, refused)
            await asyncio.wait({stopped, watcher}, timeout=1.0)
        if watcher.done():
            await watcher
    finally:
        signals.on_stop = None
        for task in tasks:
            task.cancel()
        # The report consumer leaves its group while its connections still run; bounded, so a
        # broker that does not answer cannot hold up the stop.
        await asyncio.wait(tasks, timeout=WIND_DOWN_S)


# How long the serve loop's tasks get to finish once a stop is asked for.
WIND_DOWN_S = 3.0


def demo_studies(stack: Stack) -> list[dict[str, Any]]:
    """The ImagingStudy resources ``up --demo`` announces: one per study the stack seeded in its
    PACS (a held-out synthetic radiograph without, then one with an opacity), each read by the
    chest-opacity CNN."""
    return [
        imaging_study(
            identity,
            f"demo-cxr-{seed}",
            f"demo-cxr-{'opacity' if opacity else 'clear'}",
            stack.config.dicomweb_url,
        )
        for (seed, opacity), identity in zip(DEMO_STUDIES, stack.seeded_studies, strict=True)
    ]


async def _send_demo(ingest_url: str, studies: list[dict[str, Any]]) -> None:
    await asyncio.sleep(1.0)  # let the report consumer join before the first report lands
    await _send_files(ingest_url, sample_events())
    async with httpx.AsyncClient(base_url=ingest_url, timeout=30) as client:
        for study in studies:
            await _post(client, f"ImagingStudy/{study['id']}", json.dumps(study).encode())


# Every 3 s the stack takes in model versions added to the specs and model folders (hot deploy).
RECONCILE_EVERY_TICKS = 3


def _reconcile(stack: Stack, refused: str) -> str:
    """One reconcile of the running stack; a spec or model folder that does not read (an edit in
    progress) is reported once and tried again on the next turn. The problem now shown."""
    try:
        for change in stack.reconcile():
            console.print(f"[bold]medmesh[/] {change}")
    except Exception as exc:  # noqa: BLE001 -- a half-written spec, YAML or pbtxt is reported, not fatal
        problem = f"{type(exc).__name__}: {exc}"
        if problem != refused:
            console.print(f"[yellow]medmesh: new model versions not taken in yet:[/] {problem}")
        return problem
    return ""


SENT_AT: dict[str, float] = {}
# "result": a risk model's band, or what a findings or classification model found.
REPORT_COLUMNS = ("patient", "model", "version", "score", "result", "end-to-end")
REPORT_ROW = "{:<16} {:<14} {:<7} {:<12} {:<20} {:>10}"


async def _send_files(ingest_url: str, files: list[Path]) -> None:
    async with httpx.AsyncClient(base_url=ingest_url, timeout=30) as client:
        for path in files:
            await _post(client, path.name, path.read_bytes())


async def _post(client: httpx.AsyncClient, name: str, body: bytes) -> None:
    """POST one FHIR resource or Bundle to ingest's /fhir and print the answer."""
    sent = time.perf_counter()
    response = await client.post(
        "/fhir", content=body, headers={"content-type": "application/fhir+json"}
    )
    ids = [i for i in response.headers.get(h.CORRELATION_ID, "").split(",") if i]
    for correlation_id in ids:
        SENT_AT[correlation_id] = sent
    summary = answer_summary(response.json())[:160]
    # One line each (soft_wrap: the terminal folds a long one, rich does not break it).
    console.print(f"[cyan]sent[/] {name}: HTTP {response.status_code} {summary}", soft_wrap=True)


def answer_summary(body: dict[str, Any]) -> str:
    """One line of what ingest answered: an OperationOutcome's diagnostics, or for a batch or
    transaction (answered with a batch-response / transaction-response Bundle since issue 18)
    the Bundle's type, how many entries got each status, and their outcomes' diagnostics."""
    if body.get("resourceType") != "Bundle":
        return "; ".join(i.get("diagnostics", "") for i in body.get("issue", []))
    responses = [e.get("response", {}) for e in body.get("entry", [])]
    statuses = Counter(str(r.get("status", "?")) for r in responses)
    counts = ", ".join(f"{n}x {status}" for status, n in statuses.items())
    diagnostics = dict.fromkeys(
        i.get("diagnostics", "")
        for response in responses
        for i in response.get("outcome", {}).get("issue", [])
        if i.get("diagnostics")
    )
    return "; ".join([f"{body.get('type')}: {counts}", *diagnostics])


async def _watch_reports(bootstrap: str) -> None:
    consumer = AIOKafkaConsumer(
        topics.REPORTS_DIAGNOSTIC,
        bootstrap_servers=bootstrap,
        group_id=f"medmesh-cli-{os.getpid()}",
        auto_offset_reset="latest",
        isolation_level="read_committed",
    )
    await consumer.start()
    console.print(
        f"[bold magenta]       {REPORT_ROW.format(*REPORT_COLUMNS)}[/]",
        highlight=False,
        soft_wrap=True,
    )
    try:
        async for record in consumer:
            arrived = time.perf_counter()
            headers = {k: bytes(v).decode() for k, v in record.headers}
            report = summarize(record.key, record.value or b"", headers)
            sent = SENT_AT.pop(report.correlation_id, None)
            latency = f"{(arrived - sent) * 1000:.0f} ms" if sent is not None else "-"
            row = REPORT_ROW.format(
                report.patient_pseudonym[:15],
                report.model,
                f"v{report.model_version}",
                report.score_text,
                report.band,
                latency,
            )
            console.print(f"[bold]report[/] {row}", highlight=False, soft_wrap=True)
    finally:
        await consumer.stop()


@app.command()
def down() -> None:
    """Stop a stack started by `medmesh up` in another terminal."""
    pid_file = run_dir("stack") / PID_FILE
    if not pid_file.exists():
        console.print("no running medmesh stack found")
        raise typer.Exit(1)
    pid = _running_up_pid(pid_file)
    if pid is None:
        pid_file.unlink(missing_ok=True)
        console.print("the medmesh stack was not running (stale pid file removed)")
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pid_file.unlink(missing_ok=True)
        console.print("the medmesh stack was not running (stale pid file removed)")
        return
    for _ in range(120):
        if not pid_file.exists():
            console.print("medmesh stopped")
            return
        time.sleep(0.5)
    console.print("medmesh did not stop within 60s")
    raise typer.Exit(1)


@app.command()
def logs(
    name: Annotated[
        str, typer.Argument(help="a component: ingest, router, reporting, a worker, kafka, ...")
    ],
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="keep printing new lines until Ctrl-C")
    ] = False,
    lines: Annotated[int, typer.Option("--lines", "-n", min=0, help="how many last lines")] = 40,
    state_dir: Annotated[
        Path | None,
        typer.Option(help="the stack's state folder (default: var/stack, where `up` writes)"),
    ] = None,
) -> None:
    """Print the last lines of one component's log from the local stack (`medmesh up`)."""
    folder = state_dir if state_dir is not None else run_dir("stack")
    found = log_files(folder)
    if name not in found:
        known = ", ".join(found) if found else "none (has `medmesh up` run here?)"
        typer.echo(f"medmesh: no log named {name!r} in {folder}; logs: {known}", err=True)
        raise typer.Exit(2)
    # Written as they are: a log line is not rich markup, and JSON brackets must stay as they are.
    last, size = tail(found[name], lines)
    sys.stdout.writelines(last)
    sys.stdout.flush()
    if not follow:
        return
    try:
        for line in follow_log(found[name], size):
            sys.stdout.write(line)
            sys.stdout.flush()
    except KeyboardInterrupt:
        return  # Ctrl-C is how --follow ends


@app.command()
def send(
    files: Annotated[list[Path], typer.Argument(help="FHIR JSON files (resources or Bundles)")],
    url: Annotated[str, typer.Option(help="ingest base URL")] = DEFAULT_INGEST,
) -> None:
    """POST FHIR files to a running ingest and print its answers."""
    asyncio.run(_send_files(url, files))


@app.command()
def load(
    rate: Annotated[float, typer.Option(help="vital-sign Bundles per second (open loop)")] = 10.0,
    seconds: Annotated[float, typer.Option(help="how long to send")] = 60.0,
    patients: Annotated[int, typer.Option(help="distinct patients")] = 500,
    url: Annotated[str, typer.Option(help="ingest base URL")] = DEFAULT_INGEST,
    bootstrap: Annotated[str, typer.Option(help="Kafka bootstrap")] = "127.0.0.1:9092",
) -> None:
    """Send steady vital-sign traffic (new patients each run) and summarise its reports."""
    template = load_template(sample_events()[0])
    count = max(1, int(rate * seconds))
    events = vitals_events(
        template,
        patients,
        count,
        seed=time.time_ns(),
        prefix=f"load-{os.getpid()}-{time.time_ns() % 10**6}",
    )
    console.print(f"sending {count} Bundles over {patients} patients at {rate:g}/s ...")
    # Drawn only on a terminal: piped or in CI, rich prints the bar once at the end.
    with Progress(
        TextColumn("answered"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
    ) as progress:
        answered = progress.add_task("answered", total=count)
        result = asyncio.run(
            run_load(url, bootstrap, events, rate, on_answer=lambda: progress.advance(answered))
        )
    console.print(markdown_table([result.http, result.end_to_end]))
    console.print(f"non-2xx answers: {result.non_2xx}; reports missing: {result.missing}")


app.command()(ops.trace)
app.command()(ops.status)
app.add_typer(ops.dlq_app, name="dlq")
app.command()(bench)

app.add_typer(models_app, name="models")

if __name__ == "__main__":
    app()
