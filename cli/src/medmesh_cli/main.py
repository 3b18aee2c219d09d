"""The ``medmesh`` command: run the local stack, send FHIR, watch reports."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Annotated

import httpx
import typer
from aiokafka import AIOKafkaConsumer
from rich.console import Console

from medmesh_cli.bench.command import bench
from medmesh_cli.bench.pipeline import load_template, run_load, vitals_events
from medmesh_cli.bench.stats import markdown_table
from medmesh_cli.devstack.overlay import with_overlay
from medmesh_cli.devstack.paths import repo_root, run_dir
from medmesh_cli.devstack.stack import Stack, StackConfig
from medmesh_cli.models import models_app
from medmesh_cli.ops import commands as ops
from medmesh_cli.reports import summarize
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
    logs: Annotated[bool, typer.Option(help="stream every process's log with a prefix")] = True,
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
    stack = Stack(config)
    started = time.monotonic()
    console.print("[bold]medmesh[/] starting Kafka, Triton and the services ...")
    stack.start()
    pid_file.write_text(str(os.getpid()))
    console.print(
        f"[bold green]medmesh is up[/] in {time.monotonic() - started:.1f}s: "
        f"POST FHIR to {config.ingest_url}/fhir; state and logs in {config.state_dir}"
    )

    def request_stop(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGHUP, request_stop)
    failed = False
    try:
        asyncio.run(_serve(stack, demo))
    except KeyboardInterrupt:
        console.print("[bold]medmesh[/] stopping ...")
    except ProcessExitedError as exc:
        console.print(f"[bold red]medmesh: {exc}[/]")
        failed = True
    finally:
        stack.stop()
        pid_file.unlink(missing_ok=True)
        console.print("[bold]medmesh[/] stopped")
    if failed:
        raise typer.Exit(1)


class ProcessExitedError(RuntimeError):
    """A process of the stack exited while the stack was up."""


async def _serve(stack: Stack, demo: bool) -> None:
    config = stack.config
    watcher = asyncio.create_task(_watch_reports(config.bootstrap))
    if demo:
        await asyncio.sleep(1.0)  # let the report consumer join before the first report lands
        await _send_files(config.ingest_url, sample_events())
    refused = ""
    tick = 0
    while not watcher.done():
        dead = stack.exited()
        if dead:
            watcher.cancel()
            raise ProcessExitedError(
                f"{', '.join(dead)} exited; stopping the stack (logs in {config.state_dir})"
            )
        tick += 1
        if tick % RECONCILE_EVERY_TICKS == 0:
            refused = _reconcile(stack, refused)
        await asyncio.sleep(1.0)
    await watcher


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
REPORT_COLUMNS = ("patient", "model", "version", "score", "band", "end-to-end")
REPORT_ROW = "{:<16} {:<14} {:<7} {:<12} {:<11} {:>10}"


async def _send_files(ingest_url: str, files: list[Path]) -> None:
    async with httpx.AsyncClient(base_url=ingest_url, timeout=30) as client:
        for path in files:
            sent = time.perf_counter()
            response = await client.post(
                "/fhir",
                content=path.read_bytes(),
                headers={"content-type": "application/fhir+json"},
            )
            ids = [i for i in response.headers.get(h.CORRELATION_ID, "").split(",") if i]
            for correlation_id in ids:
                SENT_AT[correlation_id] = sent
            issues = response.json().get("issue", [])
            summary = "; ".join(i.get("diagnostics", "") for i in issues)[:160]
            console.print(f"[cyan]sent[/] {path.name}: HTTP {response.status_code} {summary}")


async def _watch_reports(bootstrap: str) -> None:
    consumer = AIOKafkaConsumer(
        topics.REPORTS_DIAGNOSTIC,
        bootstrap_servers=bootstrap,
        group_id=f"medmesh-cli-{os.getpid()}",
        auto_offset_reset="latest",
        isolation_level="read_committed",
    )
    await consumer.start()
    console.print(f"[bold magenta]       {REPORT_ROW.format(*REPORT_COLUMNS)}[/]", highlight=False)
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
                f"{report.score} {report.score_unit}" if report.score is not None else "-",
                report.band,
                latency,
            )
            console.print(f"[bold]report[/] {row}", highlight=False)
    finally:
        await consumer.stop()


@app.command()
def down() -> None:
    """Stop a stack started by `medmesh up` in another terminal."""
    pid_file = run_dir("stack") / PID_FILE
    if not pid_file.exists():
        console.print("no running medmesh stack found")
        raise typer.Exit(1)
    pid = int(pid_file.read_text())
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
    result = asyncio.run(run_load(url, bootstrap, events, rate))
    console.print(markdown_table([result.http, result.end_to_end]))
    console.print(f"non-2xx answers: {result.non_2xx}; reports missing: {result.missing}")


app.command()(ops.trace)
app.command()(ops.status)
app.add_typer(ops.dlq_app, name="dlq")
app.command()(bench)

app.add_typer(models_app, name="models")

if __name__ == "__main__":
    app()
