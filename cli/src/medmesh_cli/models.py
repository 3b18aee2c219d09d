"""``medmesh models``: deploy a model version and steer its rollout through the registry.

Every command reads the latest record of the model from the compacted topic
``medmesh.models.registry``, applies one lifecycle transition (the same pure functions the
router's controller uses, from ``medmesh_contracts.lifecycle``), and writes the new record plus a
``LifecycleDecision`` on ``medmesh.models.audit``. The router follows the registry, so a change
takes effect within moments; ``status`` asks the router (``GET /models``) for live figures.
"""

from __future__ import annotations

import asyncio
import getpass
import json
import os
import socket
from collections.abc import Callable, Coroutine
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, TypeVar

import httpx
import typer
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from rich.console import Console
from rich.table import Table

from medmesh_contracts import topics
from medmesh_contracts.events import Producer, schema_of, to_wire, utc_now
from medmesh_contracts.headers import CORRELATION_ID, SCHEMA
from medmesh_contracts.lifecycle import (
    LifecycleAction,
    LifecycleDecision,
    LifecycleError,
    ModelDeployment,
    RolloutPolicy,
    advance,
    decision,
    deploy_version,
    pause,
    resume,
    roll_back,
    seed_deployment,
)
from medmesh_contracts.modelspec import (
    InputTensor,
    ModelSpec,
    OutputTensor,
    VersionSpec,
    load_spec,
)
from medmesh_runtime.kafka import topic_partitions

models_app = typer.Typer(
    help="Deploy model versions and steer their rollout (registry: medmesh.models.registry).",
    no_args_is_help=True,
)
console = Console()
T = TypeVar("T")

Bootstrap = Annotated[
    str, typer.Option(envvar="MEDMESH_KAFKA_BOOTSTRAP_SERVERS", help="Kafka bootstrap servers")
]
RouterUrl = Annotated[
    str, typer.Option(envvar="MEDMESH_ROUTER_URL", help="router base URL (for live figures)")
]
DEFAULT_BOOTSTRAP = "127.0.0.1:9092"
DEFAULT_ROUTER = "http://127.0.0.1:8181"
DEFAULT_TRITON = "http://127.0.0.1:8000"
PRODUCER = Producer(service="cli", instance=f"{socket.gethostname()}-{os.getpid()}")


def actor() -> str:
    """Who is acting: ``cli:<user>@<host>``."""
    return f"cli:{getpass.getuser()}@{socket.gethostname()}"


# --- registry I/O ------------------------------------------------------------------------------


async def read_topic(bootstrap: str, topic: str) -> list[bytes]:
    """Every non-empty value of ``topic`` up to its current end, in order per partition."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        partitions = await topic_partitions(consumer, topic)
        if not partitions:
            raise LifecycleError(f"topic {topic} does not exist (is Kafka up?)")
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        end = await consumer.end_offsets(partitions)
        values: list[bytes] = []
        while any([await consumer.position(p) < end[p] for p in partitions]):
            batches = await consumer.getmany(*partitions, timeout_ms=1000)
            for records in batches.values():
                values.extend(record.value for record in records if record.value)
        return values
    finally:
        await consumer.stop()


async def read_registry(bootstrap: str) -> dict[str, ModelDeployment]:
    """The latest deployment of every model in the registry topic."""
    latest: dict[str, ModelDeployment] = {}
    for value in await read_topic(bootstrap, topics.MODELS_REGISTRY):
        deployment = ModelDeployment.model_validate_json(value)
        latest[deployment.model] = deployment
    return latest


async def read_audit(bootstrap: str, model: str) -> list[LifecycleDecision]:
    """Every lifecycle decision about ``model``, oldest first."""
    decisions = [
        LifecycleDecision.model_validate_json(value)
        for value in await read_topic(bootstrap, topics.MODELS_AUDIT)
    ]
    return sorted((d for d in decisions if d.model == model), key=lambda d: d.decided_at)


async def write_change(
    bootstrap: str, deployment: ModelDeployment, audit: LifecycleDecision
) -> None:
    """Publish the new registry record and its audit event (acks=all)."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True)
    await producer.start()
    try:
        key = deployment.model.encode()
        for topic, event in ((topics.MODELS_REGISTRY, deployment), (topics.MODELS_AUDIT, audit)):
            headers = [
                (CORRELATION_ID, deployment.correlation_id.encode()),
                (SCHEMA, schema_of(type(event)).encode()),
            ]
            await producer.send_and_wait(topic, to_wire(event), key=key, headers=headers)
    finally:
        await producer.stop()


Transition = Callable[[ModelDeployment, Producer, datetime, str], ModelDeployment]


def _change(
    bootstrap: str, name: str, transition: Transition, action: LifecycleAction, reason: str
) -> ModelDeployment:
    async def run() -> ModelDeployment:
        current = (await read_registry(bootstrap)).get(name)
        if current is None:
            raise LifecycleError(f"model {name!r} is not in the registry")
        now, who = utc_now(), actor()
        changed = transition(current, PRODUCER, now, who)
        await write_change(
            bootstrap, changed, decision(current, changed, action, who, reason, PRODUCER, now)
        )
        return changed

    changed = _run_change(run())
    console.print(
        f"{name}: {action} -> revision {changed.revision}, weights {changed.weights}, "
        f"rollout {changed.rollout.phase}"
    )
    return changed


# --- Triton check ------------------------------------------------------------------------------


def check_triton_metadata(version: VersionSpec, metadata: dict[str, Any]) -> list[str]:
    """Problems between a spec version and Triton's model metadata
    (``GET /v2/models/<m>/versions/<v>``): every tensor the spec declares must exist with the
    same datatype and shape (Triton's shape leads with -1, the batch dimension)."""
    problems: list[str] = []
    served = {t["name"]: t for t in [*metadata.get("inputs", []), *metadata.get("outputs", [])]}
    target = version.triton
    declarations: list[InputTensor | OutputTensor] = [*target.inputs, *target.outputs]
    for declared in declarations:
        tensor = served.get(declared.name)
        if tensor is None:
            problems.append(f"Triton model has no tensor {declared.name!r}")
            continue
        if tensor.get("datatype") != declared.datatype:
            problems.append(
                f"tensor {declared.name!r} is {tensor.get('datatype')} in Triton,"
                f" the spec declares {declared.datatype}"
            )
        shape = [int(d) for d in tensor.get("shape", [])]
        if shape != [-1, *declared.shape]:
            problems.append(
                f"tensor {declared.name!r} has shape {shape} in Triton, the spec declares"
                f" {[-1, *declared.shape]} (batch first)"
            )
    return problems


def check_triton(spec: ModelSpec, version: int, triton_url: str) -> list[str]:
    """Is the spec's Triton model version ready, with tensors that match the spec?"""
    target = spec.version(version).triton
    base = f"{triton_url}/v2/models/{target.model}/versions/{target.version}"
    try:
        with httpx.Client(timeout=10) as client:
            ready = client.get(f"{base}/ready")
            if ready.status_code != 200:
                return [f"Triton model {target.model} v{target.version} is not ready"]
            metadata = client.get(base).json()
    except httpx.HTTPError as exc:
        return [f"Triton at {triton_url} did not answer: {exc}"]
    return check_triton_metadata(spec.version(version), metadata)


# --- commands ----------------------------------------------------------------------------------


@models_app.command()
def deploy(
    spec_file: Annotated[Path, typer.Argument(help="the model spec (YAML)", exists=True)],
    version: Annotated[int, typer.Option(help="the version to roll out")],
    shadow: Annotated[bool, typer.Option(help="start in shadow (mirrored, not reported)")] = False,
    start: Annotated[bool, typer.Option(help="start the automatic rollout now")] = True,
    steps: Annotated[str, typer.Option(help="traffic steps in percent")] = "5,10,25,50,100",
    interval: Annotated[float, typer.Option(help="seconds per step")] = 60.0,
    min_requests: Annotated[int, typer.Option(help="requests needed to judge a step")] = 50,
    max_error_rate: Annotated[float, typer.Option(help="rollback above this share")] = 0.05,
    max_p99_ms: Annotated[float, typer.Option(help="rollback above this p99 (ms)")] = 2000.0,
    min_agreement: Annotated[float, typer.Option(help="shadow: band agreement needed")] = 0.9,
    shadow_percent: Annotated[int, typer.Option(help="shadow: share mirrored (%)")] = 100,
    triton_url: Annotated[str, typer.Option(envvar="MEDMESH_TRITON_HTTP_URL")] = DEFAULT_TRITON,
    check: Annotated[bool, typer.Option(help="check the version is ready in Triton")] = True,
    bootstrap: Bootstrap = DEFAULT_BOOTSTRAP,
) -> None:
    """Validate SPEC, check Triton serves the version, register it at 0 % and start its rollout."""
    try:
        spec = load_spec(spec_file)
        spec.version(version)
        policy = RolloutPolicy(
            steps=tuple(int(s) for s in steps.split(",")),
            interval_s=interval,
            min_requests=min_requests,
            max_error_rate=max_error_rate,
            max_p99_ms=max_p99_ms,
            min_shadow_agreement=min_agreement,
            shadow_percent=shadow_percent,
        )
    except (ValueError, KeyError) as exc:
        console.print(f"[bold red]invalid spec or policy:[/] {exc}")
        raise typer.Exit(2) from exc
    if check:
        problems = check_triton(spec, version, triton_url)
        if problems:
            for problem in problems:
                console.print(f"[bold red]triton:[/] {problem}")
            raise typer.Exit(1)
        target = spec.version(version).triton
        console.print(f"triton: {target.model} v{target.version} ready, tensors match the spec")

    async def run() -> ModelDeployment:
        now, who = utc_now(), actor()
        current = (await read_registry(bootstrap)).get(spec.name)
        if current is None:
            current = seed_deployment(spec.name, spec.routing.weights, PRODUCER, now, who, policy)
        changed = deploy_version(
            current,
            version,
            PRODUCER,
            now,
            who,
            state="shadow" if shadow else "canary",
            start=start,
            policy=policy,
        )
        reason = f"deploy {spec_file.name} v{version} as {'shadow' if shadow else 'canary'}"
        await write_change(
            bootstrap, changed, decision(current, changed, "deploy", who, reason, PRODUCER, now)
        )
        return changed

    changed = _run_change(run())
    console.print(
        f"{spec.name} v{version} registered ({changed.version(version).state}, revision "
        f"{changed.revision}); rollout {changed.rollout.phase}, steps {list(policy.steps)}"
    )


@models_app.command("list")
def list_models(bootstrap: Bootstrap = DEFAULT_BOOTSTRAP) -> None:
    """Every model in the registry: its versions, states, weights and rollout."""
    registry = asyncio.run(read_registry(bootstrap))
    table = Table("model", "revision", "versions", "rollout", "changed by")
    for name, d in sorted(registry.items()):
        versions = ", ".join(
            f"v{v.version} {v.state} {v.weight}%"
            + (f" (shadow {v.shadow_percent}%)" if v.shadow_percent else "")
            for v in d.versions
        )
        rollout = "-"
        if d.rollout.version is not None:
            step = d.policy.steps[d.rollout.step] if d.rollout.step >= 0 else 0
            rollout = f"v{d.rollout.version} {d.rollout.phase} at {step}%"
        table.add_row(name, str(d.revision), versions, rollout, d.changed_by)
    console.print(table)


@models_app.command()
def history(
    name: Annotated[str, typer.Argument(help="model name")],
    last: Annotated[int, typer.Option(help="how many decisions, newest last")] = 20,
    bootstrap: Bootstrap = DEFAULT_BOOTSTRAP,
) -> None:
    """The audit trail of a model: who decided what, when, why, on which figures."""
    decisions = _run_change(read_audit(bootstrap, name))[-last:]
    table = Table("at", "action", "version", "weights", "by", "why")
    for d in decisions:
        weights = f"{d.weights_before or '-'} -> {d.weights_after}"
        version = "-" if d.version is None else f"v{d.version}"
        at = d.decided_at.strftime("%H:%M:%S")
        table.add_row(at, d.action, version, weights, d.actor, d.reason)
    console.print(table)


def _ms(value: Any) -> str:
    return "-" if value is None else f"{float(value):.1f}"


@models_app.command()
def status(
    name: Annotated[str, typer.Argument(help="model name")],
    router_url: RouterUrl = DEFAULT_ROUTER,
    as_json: Annotated[bool, typer.Option("--json", help="print the router's JSON")] = False,
) -> None:
    """Per version: state, weight, traffic in the window, errors, p50/p99, shadow agreement."""
    try:
        answer = httpx.get(f"{router_url}/models", timeout=10).json()
    except httpx.HTTPError as exc:
        console.print(f"[bold red]router at {router_url} did not answer:[/] {exc}")
        raise typer.Exit(1) from exc
    model = answer["models"].get(name)
    if model is None:
        console.print(f"[bold red]model {name!r} is not deployed[/]")
        raise typer.Exit(1)
    if as_json:
        console.print_json(json.dumps(model))
        return
    deployment = ModelDeployment.model_validate(model["deployment"])
    rollout = deployment.rollout
    step = deployment.policy.steps[rollout.step] if rollout.step >= 0 else 0
    next_in = model["next_judgement_in_s"]
    console.print(
        f"[bold]{name}[/] revision {deployment.revision}; rollout "
        f"{'v' + str(rollout.version) if rollout.version else '-'} {rollout.phase}, step {step}%"
        + (f", next judgement in {next_in:.0f}s" if next_in is not None else "")
        + f"; effective weights {model['effective_weights']}"
    )
    table = Table(
        "version",
        "state",
        "weight",
        "live",
        "requests",
        "error rate",
        "p50 ms",
        "p99 ms",
        "shadow agreement",
        "mean |diff|",
    )
    for v in deployment.versions:
        info = model["versions"][str(v.version)]
        f = info["figures"]
        agreement = f["shadow_agreement"]
        table.add_row(
            f"v{v.version}",
            v.state,
            f"{v.weight}%",
            f"{info['live_workers']} workers" if info["heartbeats_seen"] else "no heartbeats",
            f"{f['requests']} / {f['window_s']:.0f}s",
            f"{f['error_rate'] * 100:.1f}%",
            _ms(f["p50_ms"]),
            _ms(f["p99_ms"]),
            "-" if agreement is None else f"{agreement * 100:.1f}% of {f['shadow_compared']}",
            _ms(f["shadow_mean_abs_diff"]),
        )
    console.print(table)


@models_app.command()
def promote(name: str, bootstrap: Bootstrap = DEFAULT_BOOTSTRAP) -> None:
    """Move the version under rollout to its next step now (at 100 % it becomes stable)."""
    _change(bootstrap, name, advance, "promote", "manual promote")


@models_app.command()
def rollback(name: str, bootstrap: Bootstrap = DEFAULT_BOOTSTRAP) -> None:
    """Retire the version under rollout; stable takes all its traffic back."""
    _change(bootstrap, name, roll_back, "rollback", "manual rollback")


@models_app.command("pause")
def pause_rollout(name: str, bootstrap: Bootstrap = DEFAULT_BOOTSTRAP) -> None:
    """Freeze the rollout where it is (weights unchanged; the controller stops judging)."""
    _change(bootstrap, name, pause, "pause", "manual pause")


@models_app.command("resume")
def resume_rollout(name: str, bootstrap: Bootstrap = DEFAULT_BOOTSTRAP) -> None:
    """Let the controller judge the rollout again (the step's window starts now)."""
    _change(bootstrap, name, resume, "resume", "manual resume")


def _run_change(change: Coroutine[Any, Any, T]) -> T:
    """Run a registry read or change; a refused one (LifecycleError) is printed and exits 1."""
    try:
        return asyncio.run(change)
    except LifecycleError as exc:
        console.print(f"[bold red]{exc}[/]")
        raise typer.Exit(1) from exc
