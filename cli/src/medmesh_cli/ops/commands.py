"""Ops commands: `medmesh trace`, `medmesh dlq list|show|replay`, `medmesh status`."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import httpx
import typer
from aiokafka import TopicPartition
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from medmesh_cli.devstack.paths import run_dir
from medmesh_cli.devstack.stack import StackConfig, service_specs
from medmesh_cli.ops import jaeger, kafka_io, tempo
from medmesh_cli.ops.connection import (
    BootstrapOption,
    Connection,
    ContextOption,
    connect,
    run_kafka,
)
from medmesh_cli.ops.dlq import DEAD_LETTER_TOPICS, replay_of, summary
from medmesh_cli.ops.waterfall import Span, hops, read_spans, render, spans_of, trace_ids_for

console = Console()
# Kafka, its security and the services' URLs: --context, the MEDMESH_* variables the services
# read, or the local stack (medmesh_cli.ops.connection).
Bootstrap = BootstrapOption
# Where a deployment's traces are read (endpoint name: label, search), in the order asked.
TRACE_STORES: dict[str, tuple[str, Callable[[httpx.Client, str, str], list[Span]]]] = {
    "tempo": ("Tempo", tempo.find_traces),
    "jaeger": ("Jaeger", jaeger.find_traces),
}


def trace(
    correlation_id: Annotated[str, typer.Argument(help="the request's medmesh-correlation-id")],
    spans: Annotated[
        Path | None, typer.Option(help="span file (default: var/stack/spans.jsonl)")
    ] = None,
    context: ContextOption = None,
) -> None:
    """Show one clinical request's trace as a waterfall, with Kafka wait vs work per hop: from
    Tempo or Jaeger when the context or MEDMESH_TEMPO_URL / MEDMESH_JAEGER_URL names one (Tempo
    first), else from the local span file."""
    endpoints = {} if spans is not None else connect(context, None).endpoints
    store = next((name for name in TRACE_STORES if name in endpoints), None)
    if store is not None:
        label, find_traces = TRACE_STORES[store]
        url = endpoints[store]
        try:
            with httpx.Client(timeout=30) as client:
                every = find_traces(client, url, correlation_id)
        except (httpx.HTTPError, ValueError) as exc:
            console.print(f"[bold red]{label} at {url} did not answer:[/] {escape(str(exc))}")
            raise typer.Exit(1) from exc
        except (KeyError, TypeError, AttributeError) as exc:
            # JSON of another shape than the store's API documents (a proxy's page, a version
            # that moved a field): one line naming it, not a traceback.
            what = f"{type(exc).__name__}: {exc}"
            console.print(
                f"[bold red]{label} at {url} answered what is not its trace API's JSON:[/] "
                f"{escape(what)}"
            )
            raise typer.Exit(1) from exc
        where = f"{label} at {url} (flushed spans only)"
    else:
        path = spans or run_dir("stack") / "spans.jsonl"
        if not path.exists():
            console.print(f"no span file at {path}: is `medmesh up` running (or pass --spans)?")
            raise typer.Exit(1)
        every = read_spans(path)
        where = f"{path} (spans flush every ~5 s)"
    found = trace_ids_for(every, correlation_id)
    if not found:
        console.print(f"no spans mention correlation id {correlation_id} in {where}")
        raise typer.Exit(1)
    for trace_id in found:
        trace_spans = spans_of(every, trace_id)
        console.print(f"[bold]trace {trace_id}[/] ({len(trace_spans)} spans)")
        for line in render(trace_spans):
            console.print(line, highlight=False)
        # Plain lines, not a table: topic names must never be truncated to the terminal width.
        console.print("hops (topic: from -> to, time in Kafka, work in the consumer):")
        for hop in hops(trace_spans):
            console.print(
                f"  {hop.topic}: {hop.producer} -> {hop.consumer}, "
                f"Kafka {hop.wait_ms:.1f} ms, work {hop.work_ms:.1f} ms",
                highlight=False,
                soft_wrap=True,
            )


dlq_app = typer.Typer(help="Inspect and replay dead-letter topics.", no_args_is_help=True)


def _check_topic(topic: str) -> None:
    if topic not in DEAD_LETTER_TOPICS:
        console.print(f"{topic} is not a dead-letter topic; known: {', '.join(DEAD_LETTER_TOPICS)}")
        raise typer.Exit(2)


@dlq_app.command("list")
def dlq_list(context: ContextOption = None, bootstrap: Bootstrap = None) -> None:
    """Every dead-letter topic with how many entries it holds."""
    connection = connect(context, bootstrap)

    async def run() -> None:
        table = Table("topic", "entries", "holds", box=None)
        async with kafka_io.consumer(connection) as kafka:
            for topic, meaning in DEAD_LETTER_TOPICS.items():
                count, _ = await kafka_io.sizes(kafka, topic)
                table.add_row(topic, str(count), meaning)
        console.print(table)

    run_kafka(connection, run())


@dlq_app.command("show")
def dlq_show(
    topic: Annotated[str, typer.Argument(help="a dead-letter topic")],
    limit: Annotated[int, typer.Option(help="at most this many entries")] = 20,
    raw: Annotated[
        bool, typer.Option(help="also print the raw value (may hold patient data)")
    ] = False,
    context: ContextOption = None,
    bootstrap: Bootstrap = None,
) -> None:
    """The entries of a dead-letter topic: where from, when, and why."""
    _check_topic(topic)
    connection = connect(context, bootstrap)

    async def run() -> None:
        async with kafka_io.consumer(connection) as kafka:
            entries = await kafka_io.read_range(kafka, topic, limit=limit)
        for entry in entries:
            event = json.loads(entry.value)
            when = datetime.fromtimestamp(entry.timestamp_ms / 1000, UTC).isoformat(
                timespec="seconds"
            )
            source = event.get(
                "source_topic",
                event.get("task", {}).get("request", {}).get("model", "")
                or event.get("fhir_server", ""),
            )
            # Which report (or request) it was: to find it on its topic, e.g. to redeliver it.
            correlation = f" [{event['correlation_id']}]" if event.get("correlation_id") else ""
            console.print(
                f"[bold]{entry.partition}:{entry.offset}[/] {when} {event.get('schema', '?')}"
                f"{escape(correlation)} from {source}: {summary(event)}",
                highlight=False,
                soft_wrap=True,  # one entry per line, whatever the terminal width
            )
            if raw:
                console.print(
                    event.get("raw_value", event.get("task", event.get("report", ""))),
                    highlight=False,
                )
        if not entries:
            console.print(f"{topic} is empty")

    run_kafka(connection, run())


@dlq_app.command("replay")
def dlq_replay(
    topic: Annotated[str, typer.Argument(help="a dead-letter topic")],
    entry: Annotated[
        str | None, typer.Option(help="replay one entry, PARTITION:OFFSET (otherwise all new ones)")
    ] = None,
    context: ContextOption = None,
    bootstrap: Bootstrap = None,
) -> None:
    """Send dead letters back to their source topic after a fix; each entry is replayed once.

    An undeliverable report is not published again: it becomes a DeliverReport command on
    medmesh.reports.delivery-requests, which reporting delivers to the FHIR server (conditional
    creates: one copy however often). An entry that cannot be replayed (its record kept only in
    part, or nothing to replay) is skipped, saying why, and the command exits 1."""
    _check_topic(topic)
    connection = connect(context, bootstrap)
    group = f"medmesh-dlq-replay.{topic}"
    skipped: list[str] = []

    async def run() -> int:
        async with kafka_io.consumer(connection, group_id=group) as kafka:
            entries = await kafka_io.read_range(kafka, topic, from_committed=entry is None)
            if entry is not None:
                partition, offset = (int(x) for x in entry.split(":"))
                entries = [e for e in entries if (e.partition, e.offset) == (partition, offset)]
                if not entries:
                    console.print(f"no entry {entry} in {topic}")
                    raise typer.Exit(1)
            replayed = 0
            async with kafka_io.producer(connection) as out:
                for item in entries:
                    position = f"{item.partition}:{item.offset}"
                    try:
                        replay = replay_of(
                            json.loads(item.value),
                            item.key,
                            f"{topic}/{item.partition}/{item.offset}",
                        )
                    except ValueError as exc:  # JSON that does not decode, too
                        # Passed over (and committed past below): it can never be replayed, and
                        # must not stop the entries after it; `dlq show` still lists it.
                        skipped.append(position)
                        console.print(
                            f"[yellow]skipped {position}:[/] {escape(str(exc))}", soft_wrap=True
                        )
                    else:
                        await out.send_and_wait(
                            replay.topic, replay.value, key=replay.key, headers=replay.headers
                        )
                        replayed += 1
                        console.print(f"replayed {position} -> {replay.topic}", highlight=False)
                    if entry is None:
                        # Commit after each entry: an interrupted replay resumes where it stopped.
                        await kafka.commit({TopicPartition(topic, item.partition): item.offset + 1})
            return replayed

    count = run_kafka(connection, run())
    console.print(f"replayed {count} entr{'y' if count == 1 else 'ies'} from {topic}")
    if skipped:
        console.print(f"[bold red]not replayable, skipped:[/] {', '.join(skipped)}")
        raise typer.Exit(1)


def _ready(service: str, url: str) -> bool:
    """Does the service (Triton: its health API) at ``url`` say it is ready?"""
    path = "/v2/health/ready" if service == "triton" else "/readyz"
    try:
        return httpx.get(f"{url}{path}", timeout=2).is_success
    except httpx.HTTPError:
        return False


def service_endpoints(connection: Connection) -> dict[str, str]:
    """The services `status` checks: the endpoints the context or the MEDMESH_*_URL variables
    name, else every service of the local stack (`medmesh up`, one port per worker)."""
    if connection.endpoints:
        # Tempo and Jaeger are where traces are read, not services with /readyz.
        return {n: url for n, url in connection.endpoints.items() if n not in TRACE_STORES}
    try:
        local = service_specs(StackConfig())
    except (RuntimeError, OSError, ValueError):  # no checkout (its model specs) to read
        return {name: connection.endpoint(name) for name in ("ingest", "router", "reporting")}
    return {service.name: f"http://127.0.0.1:{service.port}" for service in local}


def status(context: ContextOption = None, bootstrap: Bootstrap = None) -> None:
    """Services, throughput, consumer lag and dead-letter sizes at a glance: of the context's
    deployment (--context, or the MEDMESH_* variables), else of the local stack."""
    connection = connect(context, bootstrap)
    services = Table("service", "url", "ready", box=None)
    for name, url in service_endpoints(connection).items():
        ready = _ready(name, url)
        services.add_row(name, url, "[green]yes[/]" if ready else "[red]no[/]")
    console.print(services)

    async def kafka_figures() -> None:
        lags = await kafka_io.group_lags(connection)
        table = Table("consumer group", "topic", "lag", box=None)
        for group, per_topic in lags.items():
            if not per_topic:
                table.add_row(group, "(no offset committed yet)", "-")
            for topic, lag in sorted(per_topic.items()):
                table.add_row(group, topic, str(lag))
        console.print(table)
        sizes = Table("topic", "messages", box=None)
        async with kafka_io.consumer(connection) as kafka:
            for topic in (
                "medmesh.inference.requests",
                "medmesh.reports.diagnostic",
                *DEAD_LETTER_TOPICS,
            ):
                count, _ = await kafka_io.sizes(kafka, topic)
                sizes.add_row(topic, str(count))
        console.print(sizes)

    try:
        asyncio.run(kafka_figures())
    except Exception as exc:  # reported to the operator, then a non-zero exit
        console.print(
            f"[red]Kafka at {connection.bootstrap} did not answer: {type(exc).__name__}: {exc}[/]"
        )
        raise typer.Exit(1) from exc
