"""`medmesh bench`: measured figures, side by side in one run, written under docs/benchmarks/."""

from __future__ import annotations

import asyncio
import json
import platform
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from medmesh_cli.bench.hop import cpu_count, run_hops
from medmesh_cli.bench.pipeline import load_template, run_load, vitals_events
from medmesh_cli.bench.stats import Summary, markdown_table
from medmesh_cli.devstack.paths import repo_root, run_dir
from medmesh_cli.devstack.stack import Stack, StackConfig, StackPorts

console = Console()
BENCH_PORTS = StackPorts(
    kafka=26092,
    kafka_controller=26093,
    triton_http=26000,
    triton_grpc=26001,
    triton_metrics=26002,
    ingest=26080,
    router=26081,
    first_worker=26082,
    reporting=26090,
)


def bench(
    rates: Annotated[
        str, typer.Option(help="offered loads, events per second, comma-separated")
    ] = "5,20,50",
    seconds: Annotated[float, typer.Option(help="how long each load level lasts")] = 10.0,
    patients: Annotated[int, typer.Option(help="distinct patients in the generated events")] = 500,
    hop_messages: Annotated[int, typer.Option(help="messages per hop-throughput series")] = 2000,
    out: Annotated[
        Path | None, typer.Option(help="output folder (default docs/benchmarks)")
    ] = None,
) -> None:
    """Start a private stack, measure Kafka hops (raw vs faststream) and the whole pipeline."""
    target = out or repo_root() / "docs" / "benchmarks"
    target.mkdir(parents=True, exist_ok=True)
    stack = Stack(StackConfig(ports=BENCH_PORTS, state_dir=run_dir("bench"), partitions=3))
    console.print("starting the benchmark stack ...")
    stack.start()
    try:
        report = asyncio.run(
            _measure_all(
                stack, [float(r) for r in rates.split(",")], seconds, patients, hop_messages
            )
        )
    finally:
        stack.stop()
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    (target / f"bench-{stamp}.json").write_text(json.dumps(report, indent=2) + "\n")
    markdown = _markdown(report)
    (target / f"bench-{stamp}.md").write_text(markdown)
    console.print(markdown, highlight=False)
    console.print(f"written to {target}/bench-{stamp}.json and .md")


async def _measure_all(
    stack: Stack, rates: list[float], seconds: float, patients: int, hop_messages: int
) -> dict[str, Any]:
    started = time.perf_counter()
    hops = await run_hops(stack.config.bootstrap, messages=hop_messages)
    template = load_template(
        repo_root() / "tests" / "fixtures" / "fhir" / "vitals-bundle-high.json"
    )
    levels = []
    for rate in rates:
        events = vitals_events(template, patients, max(1, int(rate * seconds)))
        result = await run_load(stack.config.ingest_url, stack.config.bootstrap, events, rate)
        levels.append(result)
        console.print(
            f"load {rate:g}/s: p50 {result.end_to_end.p50_ms:.1f} ms, "
            f"p99 {result.end_to_end.p99_ms:.1f} ms, missing {result.missing}"
        )
    return {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "wall_s": time.perf_counter() - started,
        "hops": [h.as_dict() for h in hops],
        "pipeline": [
            {
                "offered_per_s": r.offered_per_s,
                "end_to_end": r.end_to_end.as_dict(),
                "http": r.http.as_dict(),
                "missing": r.missing,
                "non_2xx": r.non_2xx,
            }
            for r in levels
        ],
    }


def _markdown(report: dict[str, Any]) -> str:
    hops = [Summary(**h) for h in report["hops"]]
    pipeline = [Summary(**p["end_to_end"]) for p in report["pipeline"]]
    http = [Summary(**p["http"]) for p in report["pipeline"]]
    return (
        f"# medmesh benchmark, {report['when']} ({report['machine']['cpus']} CPUs, "
        "broker, Triton and services on the same cores)\n\n"
        "## One Kafka hop (acks=all, 1.5 kB messages)\n\n"
        + markdown_table(hops, baseline=hops[1].name if len(hops) > 1 else None)
        + "\n## Whole pipeline, open-loop HTTP load (latency from the planned send time)\n\n"
        + markdown_table(pipeline)
        + "\n### HTTP answer (202 = durably in Kafka)\n\n"
        + markdown_table(http)
        + "\nMissing reports per level: "
        + ", ".join(f"{p['offered_per_s']:g}/s: {p['missing']}" for p in report["pipeline"])
        + "\n"
    )
