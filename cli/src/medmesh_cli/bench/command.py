"""`medmesh bench`: measured figures, side by side in one run, written under docs/benchmarks/."""

from __future__ import annotations

import asyncio
import json
import platform
import re
import shutil
import time
import uuid
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from medmesh_cli.bench.batching import batching_models_markdown, run_batching
from medmesh_cli.bench.flames import flames_markdown
from medmesh_cli.bench.flames import summary as flame_summary
from medmesh_cli.bench.hop import cpu_count, run_hops
from medmesh_cli.bench.imaging import imaging_markdown, run_imaging
from medmesh_cli.bench.ingest import ingest_markdown, run_ingest
from medmesh_cli.bench.pipeline import load_template, run_load, vitals_events
from medmesh_cli.bench.plots import hops_plot, latency_plot
from medmesh_cli.bench.router import router_markdown, run_router
from medmesh_cli.bench.scaling import run_scaling, scaling_markdown
from medmesh_cli.bench.series import ALL_SERIES, STACKLESS, parse_series
from medmesh_cli.bench.stats import Summary, markdown_table
from medmesh_cli.bench.topology import Plan, machine_details, run_topology, topology_markdown
from medmesh_cli.bench.tracing import run_tracing, tracing_markdown
from medmesh_cli.bench.worker import run_worker_path, worker_path_markdown
from medmesh_cli.devstack.kafka import PRODUCTION_JVM
from medmesh_cli.devstack.paths import repo_root, run_dir
from medmesh_cli.devstack.stack import Stack, StackConfig, StackPorts
from medmesh_contracts.modelspec import load_specs

console = Console()
# Kafka's launcher default heap (kafka-run-class.sh), with PRODUCTION_JVM for the topology series.
PRODUCTION_HEAP = "1g"


def bench(
    rates: Annotated[
        str, typer.Option(help="offered loads, events per second, comma-separated")
    ] = "5,20,50",
    seconds: Annotated[float, typer.Option(help="how long each load level lasts")] = 10.0,
    patients: Annotated[int, typer.Option(help="distinct patients in the generated events")] = 500,
    hop_messages: Annotated[int, typer.Option(help="messages per hop-throughput series")] = 2000,
    series: Annotated[
        str, typer.Option(help=f"series to run, comma-separated: {','.join(ALL_SERIES)}")
    ] = ",".join(ALL_SERIES),
    batch_tasks: Annotated[int, typer.Option(help="tasks per worker batching burst")] = 2000,
    router_messages: Annotated[int, typer.Option(help="requests per router burst")] = 2000,
    ingest_events: Annotated[int, typer.Option(help="Bundles per ingest burst")] = 500,
    tracing_rate: Annotated[
        float, typer.Option(help="offered load per tracing series, events per second")
    ] = 60.0,
    imaging_studies: Annotated[int, typer.Option(help="studies in the imaging series")] = 200,
    imaging_concurrency: Annotated[
        int, typer.Option(help="studies in flight in the imaging series' closed loop")
    ] = 32,
    out: Annotated[
        Path | None, typer.Option(help="output folder (default docs/benchmarks)")
    ] = None,
    port_base: Annotated[
        int, typer.Option(help="first port of the private stack (two benches side by side)")
    ] = 26000,
    partitions: Annotated[
        int, typer.Option(help="partitions of the stack's topics (scaling: a multiple of 2)")
    ] = 3,
    quick: Annotated[
        bool, typer.Option(help="topology: one ABBA repetition and 8 s probes (a smoke run)")
    ] = False,
    profile: Annotated[
        bool,
        typer.Option(help="topology: py-spy flame graphs of every service during one level"),
    ] = False,
    budget_minutes: Annotated[
        float | None,
        typer.Option(help="topology: skip fixed-load repetitions that would start past this"),
    ] = None,
) -> None:
    """Start a private stack and measure the selected series side by side (ratios)."""
    try:
        selected = parse_series(series)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--series") from exc
    sizes = Sizes(
        hop_messages,
        batch_tasks,
        router_messages,
        ingest_events,
        tracing_rate,
        imaging_studies,
        imaging_concurrency,
    )
    target = out or repo_root() / "docs" / "benchmarks"
    target.mkdir(parents=True, exist_ok=True)
    in_process: dict[str, Any] = {}
    if "worker" in selected:
        console.print("worker: lz4 level, telemetry per batch, adaptive linger (in process) ...")
        in_process["worker"] = run_worker_path()
    if set(selected) <= STACKLESS:
        report = {**_run_facts([], [], started=time.perf_counter()), **in_process}
    else:
        state = run_dir("bench" if port_base == 26000 else f"bench-{port_base}")
        stack = Stack(
            StackConfig(
                ports=StackPorts.from_base(port_base),
                state_dir=state,
                partitions=partitions,
                with_fhir_server=False,  # the pipeline's CPU, not a FHIR server's
            )
        )
        if {"topology", "scaling"} & set(selected):
            # A deployment's broker JVM, so that Kafka's CPU per event is not the dev stack's.
            stack.kafka.config = replace(
                stack.kafka.config, jvm_options=PRODUCTION_JVM, heap=PRODUCTION_HEAP
            )
        budget = budget_minutes * 60 if budget_minutes is not None else None
        plan = Plan.quick(budget) if quick else Plan(budget_s=budget)
        flames = state / "flames" if profile else None
        if flames is not None:
            shutil.rmtree(flames, ignore_errors=True)  # an earlier run's graphs are not this one's
        console.print("starting the benchmark stack ...")
        stack.start()
        try:
            report = asyncio.run(
                _measure_all(
                    stack,
                    [float(r) for r in rates.split(",")],
                    seconds,
                    patients,
                    sizes,
                    selected,
                    plan,
                    flames,
                )
            )
        finally:
            stack.stop()
        report = {**report, **in_process}
        if flames is not None:
            report["flames"] = {}
            for svg in sorted(flames.glob("flame-*.svg")):
                shutil.copyfile(svg, target / svg.name)
                report["flames"][svg.stem.removeprefix("flame-")] = flame_summary(svg)
                console.print(f"flame graph: {target / svg.name}")
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    (target / f"bench-{stamp}.json").write_text(json.dumps(report, indent=2) + "\n")
    if "topology" in report:
        load = report["machine"].get("load_average_1_5_15_min", ["?"] * 3)
        note = (
            f"{report['machine']['cpus']} CPUs shared by Kafka, Triton, the pipeline and any "
            f"other job; load avg 15 min {load[2]}"
        )
        latency_plot(report["topology"], target / f"bench-{stamp}-topology-latency.png", note)
        hops_plot(report["topology"], target / f"bench-{stamp}-topology-hops.png", note)
    markdown = _markdown(report)
    (target / f"bench-{stamp}.md").write_text(markdown)
    console.print(markdown, highlight=False)
    console.print(f"written to {target}/bench-{stamp}.json and .md")


@dataclass(frozen=True)
class Sizes:
    """How much each series sends."""

    hop_messages: int
    batch_tasks: int
    router_messages: int
    ingest_events: int
    tracing_rate: float
    imaging_studies: int = 200
    imaging_concurrency: int = 32


async def _measure_all(
    stack: Stack,
    rates: list[float],
    seconds: float,
    patients: int,
    sizes: Sizes,
    selected: list[str],
    plan: Plan | None = None,
    flames: Path | None = None,
) -> dict[str, Any]:
    started = time.perf_counter()
    run = uuid.uuid4().hex[:6]  # fresh patients per run and series: ingest dedupes repeats
    hops = (
        await run_hops(stack.config.bootstrap, messages=sizes.hop_messages)
        if "hop" in selected
        else []
    )
    template = load_template(
        repo_root() / "tests" / "fixtures" / "fhir" / "vitals-bundle-high.json"
    )
    extra: dict[str, Any] = {}
    # Order matters: the ingest series stops the router for a while and the tracing series
    # restarts every service with another sampling, so they run last.
    if "batching" in selected:
        console.print("batching: direct Triton vs worker vs worker with max batch 1 ...")
        # Every version of every spec that reads rows: NEWS2 costs microseconds per row, the ECG
        # screen about a millisecond, the ONNX versions run in onnxruntime; so the series show
        # the worker's cost against cheap and costly models, python and ONNX. Image models read
        # their pixels from the PACS, not from the task: the imaging series measures them.
        extra["batching"] = {
            "models": [
                await run_batching(
                    stack, tasks=sizes.batch_tasks, model=spec.name, version=version.version
                )
                for spec in load_specs(stack.config.specs_dir).values()
                if not any(column.image is not None for column in spec.inputs)
                for version in spec.versions
            ]
        }
    if "imaging" in selected:
        console.print("imaging: direct Triton vs studies through the pipeline ...")
        extra["imaging"] = await run_imaging(
            stack, studies=sizes.imaging_studies, concurrency=sizes.imaging_concurrency
        )
    if "router" in selected:
        console.print("router vs pass-through ...")
        extra["router"] = await run_router(stack, messages=sizes.router_messages)
    if "ingest" in selected:
        console.print("ingest vs plain fhir.resources loop ...")
        extra["ingest"] = await run_ingest(stack, template, events=sizes.ingest_events)
    levels = []
    for rate in rates if "pipeline" in selected else []:
        events = vitals_events(
            template, patients, max(1, int(rate * seconds)), prefix=f"bench-{run}-load{rate:g}"
        )
        result = await run_load(stack.config.ingest_url, stack.config.bootstrap, events, rate)
        levels.append(result)
        console.print(
            f"load {rate:g}/s: p50 {result.end_to_end.p50_ms:.1f} ms, "
            f"p99 {result.end_to_end.p99_ms:.1f} ms, missing {result.missing}"
        )
    if "topology" in selected:
        console.print("topology: services vs monolith, ABBA, capacity by bisection ...")
        extra["topology"] = await run_topology(
            stack,
            # A distinct patient per event (each Bundle a new event whatever ingest merges),
            # at the given rate for the given seconds.
            lambda label, rate, level_s: vitals_events(
                template,
                max(1, int(rate * level_s)),
                max(1, int(rate * level_s)),
                prefix=f"bench-{run}-{label}-{rate:g}",
            ),
            plan or Plan(),
            flames,
        )
    if "tracing" in selected:
        console.print("tracing at 100%, 10% parent-based and off ...")
        count = max(1, int(sizes.tracing_rate * seconds))
        extra["tracing"] = await run_tracing(
            stack,
            # FHIR ids allow [A-Za-z0-9-.]: the series label ("10% parent-based") is not one.
            lambda label: vitals_events(
                template,
                patients,
                count,
                prefix=f"bench-{run}-{re.sub('[^A-Za-z0-9]+', '-', label)}",
            ),
            sizes.tracing_rate,
        )
    if "scaling" in selected:
        console.print("scaling: N = 1 and 2 pinned instances of each consumer stage (ABBA) ...")
        extra["scaling"] = await run_scaling(stack, template, seconds)
    return {
        **_run_facts(
            [h.as_dict() for h in hops],
            [
                {
                    "offered_per_s": r.offered_per_s,
                    "end_to_end": r.end_to_end.as_dict(),
                    "http": r.http.as_dict(),
                    "missing": r.missing,
                    "non_2xx": r.non_2xx,
                }
                for r in levels
            ],
            started=started,
        ),
        **extra,
    }


def _run_facts(
    hops: list[dict[str, Any]], pipeline: list[dict[str, Any]], *, started: float
) -> dict[str, Any]:
    """When and where the run was, how long it took, and the hop and pipeline series."""
    return {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": cpu_count(),
            **machine_details(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "wall_s": time.perf_counter() - started,
        "hops": hops,
        "pipeline": pipeline,
    }


def _markdown(report: dict[str, Any]) -> str:
    title = (
        f"# medmesh benchmark, {report['when']} ({report['machine']['cpus']} CPUs, "
        "broker, Triton and services on the same cores)\n\n"
    )
    machine = report["machine"]
    if "cpu_model" in machine:
        title += (
            f"Machine: {machine['cpu_model']}, {machine.get('memory_gib', '?')} GiB; load average "
            f"(1, 5, 15 min) at the end: {machine.get('load_average_1_5_15_min', '?')}.\n\n"
        )
    sections = [title]
    if report["hops"]:
        sections.append(_hops_markdown(report))
    if report["pipeline"]:
        sections.append(_pipeline_markdown(report))
    for key, heading, render in (
        ("worker", "The inference worker's own costs, in process (issue 17)", worker_path_markdown),
        ("batching", "Batching gain on Triton (issue 5)", batching_models_markdown),
        (
            "imaging",
            "Imaging studies: pipeline vs direct Triton, and the time split (issue 19)",
            imaging_markdown,
        ),
        ("router", "Router vs a pass-through relay (issue 4, burst)", router_markdown),
        (
            "ingest",
            "Ingest alone vs a plain parse-and-produce loop (issue 3, burst)",
            ingest_markdown,
        ),
        ("tracing", "Pipeline throughput by trace sampling (issue 7)", tracing_markdown),
        (
            "topology",
            "Services vs monolith, interleaved ABBA, with the in-process floor (issues 9, 17)",
            topology_markdown,
        ),
        (
            "flames",
            "Flame graphs, one half-capacity level per topology (py-spy, flame-<process>.svg)",
            flames_markdown,
        ),
        (
            "scaling",
            "Scaling out: N = 1 and 2 pinned instances per stage (issue 17)",
            scaling_markdown,
        ),
    ):
        if key in report:
            sections.append(f"## {heading}\n\n" + render(report[key]))
    return "\n".join(sections)


def _hops_markdown(report: dict[str, Any]) -> str:
    hops = [Summary(**h) for h in report["hops"]]
    return "## One Kafka hop (acks=all, 1.5 kB messages)\n\n" + markdown_table(
        hops, baseline=hops[1].name if len(hops) > 1 else None
    )


def _pipeline_markdown(report: dict[str, Any]) -> str:
    pipeline = [Summary(**p["end_to_end"]) for p in report["pipeline"]]
    http = [Summary(**p["http"]) for p in report["pipeline"]]
    return (
        "## Whole pipeline, open-loop HTTP load (latency from the planned send time)\n\n"
        + markdown_table(pipeline)
        + "\n### HTTP answer (202 = durably in Kafka)\n\n"
        + markdown_table(http)
        + "\nMissing reports per level: "
        + ", ".join(f"{p['offered_per_s']:g}/s: {p['missing']}" for p in report["pipeline"])
        + "\n"
    )
