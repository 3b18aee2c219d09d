"""``medmesh models``: deploy a model version and steer its rollout through the registry; check,
scaffold and migrate model specs offline (``validate``, ``new``, ``migrate``: medmesh_cli.modelkit).

Every command reads the latest record of the model from the compacted topic
``medmesh.models.registry``, applies one lifecycle transition (the same pure functions the
router's controller uses, from ``medmesh_contracts.lifecycle``), and writes the new record plus a
``LifecycleDecision`` on ``medmesh.models.audit``. The router follows the registry, so a change
takes effect within moments; ``status`` asks the router (``GET /models``) for live figures.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from collections.abc import Callable, Coroutine
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, TypeVar

import httpx
import typer
import yaml
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from medmesh_cli import modelkit
from medmesh_cli.devstack.paths import repo_root
from medmesh_cli.devstack.topics import create_topics
from medmesh_cli.devstack.triton import is_model_ready, load_model, unload_model
from medmesh_cli.ops.connection import (
    BootstrapOption,
    Connection,
    ContextOption,
    as_connection,
    connect,
    run_kafka,
)
from medmesh_contracts import topics
from medmesh_contracts.events import Producer, schema_of, to_wire, utc_now
from medmesh_contracts.headers import CORRELATION_ID, SCHEMA
from medmesh_contracts.lifecycle import (
    LifecycleAction,
    LifecycleDecision,
    LifecycleError,
    ModelDeployment,
    RolloutPolicy,
    RoutingRule,
    advance,
    decision,
    deploy_version,
    pause,
    resume,
    roll_back,
    seed_deployment,
    with_rules,
)
from medmesh_contracts.modelspec import (
    SPEC_SCHEMA,
    InputTensor,
    ModelSpec,
    OutputTensor,
    VersionSpec,
    load_spec,
    load_specs,
    parse_spec,
)
from medmesh_runtime.kafka import read_to_end, topic_partitions

models_app = typer.Typer(
    help="Deploy model versions and steer their rollout (registry: medmesh.models.registry);"
    " check, scaffold and migrate model specs offline.",
    no_args_is_help=True,
)
console = Console()
T = TypeVar("T")

# Kafka (with its security settings) and the services' URLs come from --context, the MEDMESH_*
# variables (as the services read them) or the local stack's defaults: medmesh_cli.ops.connection.
Bootstrap = BootstrapOption
RouterUrl = Annotated[
    str | None,
    typer.Option(
        help="router base URL, for live figures (default: the context's, else MEDMESH_ROUTER_URL,"
        " else the local stack's http://127.0.0.1:8181)",
        show_default=False,
    ),
]
TritonUrl = Annotated[
    str | None,
    typer.Option(
        help="Triton's HTTP base URL (default: the context's, else MEDMESH_TRITON_HTTP_URL, else"
        " the local stack's http://127.0.0.1:8000)",
        show_default=False,
    ),
]
Repository = Annotated[
    Path | None,
    typer.Option(
        help="the Triton model repository (default: models/ beside the spec's specs/ folder, as"
        " an overlay has, else deploy/triton/models of the checkout)",
        file_okay=False,
    ),
]
PRODUCER = Producer(service="cli", instance=f"{socket.gethostname()}-{os.getpid()}")


# --- registry I/O ------------------------------------------------------------------------------


async def read_topic(kafka: Connection | str, topic: str) -> list[bytes]:
    """Every non-empty value of ``topic`` up to its current end, in order per partition."""
    consumer = AIOKafkaConsumer(**as_connection(kafka).kafka(enable_auto_commit=False))
    try:
        # Inside: a start that fails (a refused login) still closes what it opened.
        await consumer.start()
        partitions = await topic_partitions(consumer, topic)
        if not partitions:
            raise LifecycleError(f"topic {topic} does not exist (is Kafka up?)")
        values: list[bytes] = []
        await read_to_end(
            consumer,
            partitions,
            lambda record: values.append(record.value) if record.value else None,
        )
        return values
    finally:
        await consumer.stop()


async def read_registry(kafka: Connection | str) -> dict[str, ModelDeployment]:
    """The latest deployment of every model in the registry topic."""
    latest: dict[str, ModelDeployment] = {}
    for value in await read_topic(kafka, topics.MODELS_REGISTRY):
        deployment = ModelDeployment.model_validate_json(value)
        latest[deployment.model] = deployment
    return latest


async def read_audit(kafka: Connection | str, model: str) -> list[LifecycleDecision]:
    """Every lifecycle decision about ``model``, oldest first."""
    decisions = [
        LifecycleDecision.model_validate_json(value)
        for value in await read_topic(kafka, topics.MODELS_AUDIT)
    ]
    return sorted((d for d in decisions if d.model == model), key=lambda d: d.decided_at)


async def write_change(
    kafka: Connection | str, deployment: ModelDeployment, audit: LifecycleDecision
) -> None:
    """Publish the new registry record and its audit event (acks=all)."""
    producer = AIOKafkaProducer(**as_connection(kafka).kafka(acks="all", enable_idempotence=True))
    try:
        await producer.start()
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
    kafka: Connection, name: str, transition: Transition, action: LifecycleAction, reason: str
) -> ModelDeployment:
    async def run() -> ModelDeployment:
        current = (await read_registry(kafka)).get(name)
        if current is None:
            raise LifecycleError(f"model {name!r} is not in the registry")
        now, who = utc_now(), kafka.principal()
        changed = transition(current, PRODUCER, now, who)
        await write_change(
            kafka, changed, decision(current, changed, action, who, reason, PRODUCER, now)
        )
        return changed

    changed = _run_change(kafka, run())
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
    triton_url: TritonUrl = None,
    check: Annotated[bool, typer.Option(help="check the version is ready in Triton")] = True,
    load: Annotated[
        bool, typer.Option(help="load the version's Triton model (repository API) if not ready")
    ] = True,
    repository: Repository = None,
    context: ContextOption = None,
    bootstrap: Bootstrap = None,
) -> None:
    """Validate SPEC, load and check the version in Triton, register it at 0 % and start its
    rollout, without restarting Triton or any service (hot deploy).

    The version is first checked offline against its Triton model folder in the repository
    (config.pbtxt, ONNX graph, the spec's placeholders), as `validate` does; skipped, saying so,
    when the repository has no folder for its Triton model.
    """
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
    kafka = connect(context, bootstrap)
    triton_url = triton_url or kafka.endpoint("triton")
    offline_check(spec, spec_file, version, repository)
    if load:
        load_in_triton(spec.version(version), triton_url)
    if check:
        problems = check_triton(spec, version, triton_url)
        if problems:
            for problem in problems:
                console.print(f"[bold red]triton:[/] {problem}")
            raise typer.Exit(1)
        target = spec.version(version).triton
        console.print(f"triton: {target.model} v{target.version} ready, tensors match the spec")

    async def run() -> ModelDeployment:
        await ensure_task_topic(kafka, spec.name, version)
        now, who = utc_now(), kafka.principal()
        current = (await read_registry(kafka)).get(spec.name)
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
            kafka, changed, decision(current, changed, "deploy", who, reason, PRODUCER, now)
        )
        return changed

    changed = _run_change(kafka, run())
    console.print(
        f"{spec.name} v{version} registered ({changed.version(version).state}, revision "
        f"{changed.revision}); rollout {changed.rollout.phase}, steps {list(policy.steps)}"
    )


def _say(text: str, style: str = "") -> None:
    """Print a line as it is (no markup, no wrapping), in ``style``."""
    console.print(escape(text), style=style or None, soft_wrap=True)


def _repository(spec_file: Path, given: Path | None) -> Path | None:
    """The repository to check ``spec_file`` against (``--repository``, else the default); None
    when there is no checkout to take the default from."""
    if given is not None:
        return given
    try:
        checkout = repo_root()
    except RuntimeError:
        return None
    return modelkit.default_repository(spec_file, checkout)


def offline_check(spec: ModelSpec, spec_file: Path, version: int, given: Path | None) -> None:
    """``deploy``'s offline check: the version against its Triton model folder (config.pbtxt,
    ONNX graph) and the spec's placeholders, before Triton and Kafka; exit 1 on a problem.
    Skipped, saying so, when the repository has no folder for the version's Triton model."""
    target = spec.version(version).triton
    repository = _repository(spec_file, given)
    model_dir = None if repository is None else repository / target.model
    if repository is None or model_dir is None or not model_dir.is_dir():
        where = "no checkout to find it in" if model_dir is None else f"no {model_dir}"
        _say(
            f"offline check skipped: no Triton model folder for {target.model} ({where});"
            " pass --repository to check one"
        )
        return
    problems = modelkit.validate_spec_against_repository(
        spec, repository, versions=[version], source=str(spec_file)
    )
    if problems:
        for problem in problems:
            _say(f"offline check: {problem}", "bold red")
        raise typer.Exit(1)
    _say(f"offline check: {spec_file} v{version} agrees with {modelkit.show_path(model_dir)}")


@models_app.command()
def validate(
    spec_file: Annotated[Path, typer.Argument(help="the model spec (YAML)", exists=True)],
    repository: Repository = None,
    version: Annotated[int | None, typer.Option(help="check this version only")] = None,
) -> None:
    """Check offline that SPEC agrees with its Triton config.pbtxt and ONNX graphs.

    Tensor names, datatypes and shapes, batching, platform/backend, version folders, element
    types medmesh or Triton cannot use, the spec's own checks and placeholders left by `new`.
    Exit 0 with one OK line per version, 1 listing the problems (each with its file and fix).
    """
    source = str(spec_file)
    try:
        document = yaml.safe_load(spec_file.read_text())
        spec = parse_spec(document)
    except (yaml.YAMLError, ValueError) as exc:
        _say(f"{source} is not a valid model spec: {exc}", "bold red")
        raise typer.Exit(1) from exc
    if isinstance(document, dict) and document.get("schema") == modelkit.V1_SCHEMA:
        _say(f"{source} is a {modelkit.V1_SCHEMA} spec: `medmesh models migrate` writes it as v2")
    checked = _repository(spec_file, repository)
    if checked is None:
        _say("no medmesh checkout to find deploy/triton/models in: pass --repository", "bold red")
        raise typer.Exit(1)
    try:
        result = modelkit.check_spec(
            spec, checked, versions=None if version is None else [version], source=source
        )
    except KeyError as exc:
        _say(f"{source} declares no version {version}", "bold red")
        raise typer.Exit(1) from exc
    problems = result.all_problems
    if problems:
        for problem in problems:
            _say(problem, "red")
        _say(
            f"{len(problems)} problem(s) in {source} (checked against"
            f" {modelkit.show_path(checked)}); nothing was deployed or changed",
            "bold red",
        )
        raise typer.Exit(1)
    for checked_version in result.versions:
        _say(f"OK {source} version {checked_version.version}: {checked_version.summary}")


@models_app.command()
def new(
    name: Annotated[str, typer.Argument(help="the model's name: its Triton folder and spec")],
    onnx_file: Annotated[
        Path, typer.Option("--onnx", help="the ONNX model file", exists=True, dir_okay=False)
    ],
    repository: Annotated[
        Path | None,
        typer.Option(help="the Triton model repository (default: deploy/triton/models)"),
    ] = None,
    specs: Annotated[
        Path | None, typer.Option(help="the model spec folder (default: deploy/models)")
    ] = None,
    max_batch_size: Annotated[int, typer.Option(help="rows per Triton batch")] = 64,
    waveform: Annotated[
        list[str] | None,
        typer.Option(
            help="an input tensor holding a sampled signal (e.g. an ECG lead): fed by one"
            " waveform input instead of one input per value (repeatable)"
        ),
    ] = None,
) -> None:
    """Scaffold a Triton folder and a model spec from an ONNX file.

    Writes REPOSITORY/NAME/config.pbtxt, REPOSITORY/NAME/1/model.onnx and SPECS/NAME.yaml (v2),
    whose TODO placeholders the owner completes before `validate` passes. Never overwrites.
    """
    if repository is None or specs is None:
        checkout = repo_root()
        repository = repository or checkout / "deploy" / "triton" / "models"
        specs = specs or checkout / "deploy" / "models"
    model_dir = repository / name
    config_file = model_dir / modelkit.CONFIG_FILE
    onnx_target = model_dir / "1" / modelkit.DEFAULT_ONNX_FILE
    spec_file = specs / f"{name}.yaml"
    existing = [modelkit.show_path(p) for p in (config_file, onnx_target, spec_file) if p.exists()]
    if existing:
        _say(
            f"refusing to overwrite {', '.join(existing)}: remove them or pick another name",
            "bold red",
        )
        raise typer.Exit(1)
    try:
        graph = modelkit.read_graph(onnx_file)
        scaffold = modelkit.scaffold(
            name,
            graph,
            max_batch_size=max_batch_size,
            waveforms=waveform or (),
            onnx_source=modelkit.show_path(onnx_file),
            model_folder=modelkit.show_path(model_dir),
            spec_file=modelkit.show_path(spec_file),
        )
    except ValueError as exc:
        for line in str(exc).splitlines():
            _say(line, "bold red")
        raise typer.Exit(1) from exc
    onnx_target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(onnx_file, onnx_target)
    with config_file.open("x") as out:
        out.write(scaffold.config_text)
    specs.mkdir(parents=True, exist_ok=True)
    with spec_file.open("x") as out:
        out.write(scaffold.spec_text)
    for path in (config_file, onnx_target, spec_file):
        _say(f"created {modelkit.show_path(path)}")
    for wide in modelkit.wide_features(graph, waveform or ()):
        _say(
            f"note: input {wide} is scaffolded with one FHIR input per value; if it holds a signal,"
            " delete the files and rerun with --waveform " + wide,
            "yellow",
        )
    left = len(modelkit.placeholders(scaffold.spec))
    _say(
        f"next: complete the {left} {modelkit.PLACEHOLDER} placeholders of"
        f" {modelkit.show_path(spec_file)}, then `medmesh models validate"
        f" {modelkit.show_path(spec_file)}`"
    )


@models_app.command()
def migrate(
    spec_file: Annotated[Path, typer.Argument(help="a version 1 model spec", exists=True)],
    write: Annotated[bool, typer.Option(help="rewrite SPEC_FILE in place")] = False,
) -> None:
    """Print (or --write in place) the version 2 YAML of a version 1 model spec."""
    original = spec_file.read_text()
    try:
        migrated = modelkit.migrated_text(original, str(spec_file))
    except (yaml.YAMLError, modelkit.MigrationError) as exc:
        _say(str(exc), "bold red")
        raise typer.Exit(1) from exc
    if write:
        spec_file.write_text(migrated)
        _say(f"wrote {spec_file} ({SPEC_SCHEMA})")
    else:
        typer.echo(migrated, nl=False)


@models_app.command("list")
def list_models(context: ContextOption = None, bootstrap: Bootstrap = None) -> None:
    """Every model in the registry: its versions, states, weights and rollout."""
    kafka = connect(context, bootstrap)
    registry = _run_change(kafka, read_registry(kafka))
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
    context: ContextOption = None,
    bootstrap: Bootstrap = None,
) -> None:
    """The audit trail of a model: who decided what, when, why, on which figures."""
    kafka = connect(context, bootstrap)
    decisions = _run_change(kafka, read_audit(kafka, name))[-last:]
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
    router_url: RouterUrl = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the router's JSON")] = False,
    context: ContextOption = None,
) -> None:
    """Per version: state, weight, traffic in the window, errors, p50/p99, shadow agreement."""
    router_url = router_url or connect(context).endpoint("router")
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
def promote(name: str, context: ContextOption = None, bootstrap: Bootstrap = None) -> None:
    """Move the version under rollout to its next step now (at 100 % it becomes stable)."""
    _change(connect(context, bootstrap), name, advance, "promote", "manual promote")


@models_app.command()
def rollback(
    name: str,
    unload: Annotated[
        bool,
        typer.Option(help="unload the retired version's Triton model when nothing else uses it"),
    ] = True,
    specs: Annotated[
        Path | None,
        typer.Option(
            envvar="MEDMESH_MODEL_SPECS_DIR", help="the model specs folder (default deploy/models)"
        ),
    ] = None,
    triton_url: TritonUrl = None,
    context: ContextOption = None,
    bootstrap: Bootstrap = None,
) -> None:
    """Retire the version under rollout; stable takes all its traffic back, and the retired
    version's Triton model is unloaded (repository API) unless a live version still uses it."""
    kafka = connect(context, bootstrap)
    changed = _change(kafka, name, roll_back, "rollback", "manual rollback")
    if unload:
        folder = specs if specs is not None else repo_root() / "deploy" / "models"
        unload_retired(
            changed, load_specs(folder).get(name), triton_url or kafka.endpoint("triton")
        )


# --- hot deploy: Triton's repository API and the task topic -------------------------------------


def _host(url: str) -> str:
    """``http://host:port`` -> ``host:port`` (the form the Triton repository calls take)."""
    return url.split("://", 1)[-1].rstrip("/")


def load_in_triton(version: VersionSpec, triton_url: str) -> None:
    """Load the version's Triton model through the repository API unless the version is ready.

    Triton must run in explicit model-control mode; loading reads the model folder again, so a
    new version folder of a served model is picked up, and models served now keep serving.
    """
    target = version.triton
    if is_model_ready(_host(triton_url), target.model, target.version):
        return
    console.print(f"triton: loading {target.model} (POST /v2/repository/models/.../load) ...")
    try:
        load_model(_host(triton_url), target.model)
    except RuntimeError as exc:
        console.print(f"[bold red]triton:[/] {escape(str(exc))}")
        raise typer.Exit(1) from exc


def triton_models_in_use(deployment: ModelDeployment, spec: ModelSpec) -> set[str]:
    """The Triton models that the deployment's live (not retired) versions are served by."""
    return {
        spec.version(v.version).triton.model
        for v in deployment.versions
        if v.state != "retired" and v.version in {s.version for s in spec.versions}
    }


def unload_retired(deployment: ModelDeployment, spec: ModelSpec | None, triton_url: str) -> None:
    """Unload the Triton model of the version just rolled back, when no live version uses it."""
    retired = deployment.rollout.version
    if spec is None or retired is None:
        console.print("triton: no spec for the retired version; nothing unloaded")
        return
    try:
        model = spec.version(retired).triton.model
    except KeyError:
        console.print(f"triton: the spec has no version {retired}; nothing unloaded")
        return
    if model in triton_models_in_use(deployment, spec):
        console.print(f"triton: {model} still serves a live version; kept loaded")
        return
    try:
        unload_model(_host(triton_url), model)
    except RuntimeError as exc:
        console.print(f"[bold red]triton:[/] {escape(str(exc))}")
        raise typer.Exit(1) from exc
    console.print(f"triton: {model} unloaded")


async def ensure_task_topic(kafka: Connection | str, model: str, version: int) -> None:
    """Create the version's task topic (auto-creation is off) with the requests topic's
    partition count, unless it exists."""
    connection = as_connection(kafka)
    consumer = AIOKafkaConsumer(**connection.kafka(enable_auto_commit=False))
    try:
        await consumer.start()
        partitions = len(await topic_partitions(consumer, topics.INFERENCE_REQUESTS)) or 1
    finally:
        await consumer.stop()
    await create_topics(
        connection.bootstrap,
        [topics.task_topic_spec(model, version, partitions)],
        security=connection.security(),
    )


@models_app.command("pause")
def pause_rollout(name: str, context: ContextOption = None, bootstrap: Bootstrap = None) -> None:
    """Freeze the rollout where it is (weights unchanged; the controller stops judging)."""
    _change(connect(context, bootstrap), name, pause, "pause", "manual pause")


@models_app.command("resume")
def resume_rollout(name: str, context: ContextOption = None, bootstrap: Bootstrap = None) -> None:
    """Let the controller judge the rollout again (the step's window starts now)."""
    _change(connect(context, bootstrap), name, resume, "resume", "manual resume")


RULE_ATTRIBUTES = ("version", "site", "ward", "source_system")


def parse_rule(text: str) -> RoutingRule:
    """``version=2,site=north,ward=icu`` as a RoutingRule; ValueError naming what is wrong."""
    given: dict[str, str] = {}
    for item in text.split(","):
        key, separator, value = item.partition("=")
        key, value = key.strip().replace("-", "_"), value.strip()
        if not separator or not value or key not in RULE_ATTRIBUTES:
            raise ValueError(
                f"{item.strip()!r}: a rule is key=value pairs of {', '.join(RULE_ATTRIBUTES)}"
            )
        if key in given:
            raise ValueError(f"{key} is given twice")
        given[key] = value
    if "version" not in given or not given["version"].isdigit():
        raise ValueError("a rule needs version=<number>")
    if len(given) == 1:
        raise ValueError("a rule needs at least one of site, ward, source_system")
    return RoutingRule.model_validate(given)


@models_app.command()
def route(
    name: Annotated[str, typer.Argument(help="model name")],
    rule: Annotated[
        list[str] | None,
        typer.Option(
            "--rule",
            help="pin matching requests to a version: version=2,site=north,ward=icu (repeatable;"
            " the first matching rule wins)",
        ),
    ] = None,
    clear: Annotated[bool, typer.Option(help="remove every routing rule")] = False,
    context: ContextOption = None,
    bootstrap: Bootstrap = None,
) -> None:
    """Replace the model's routing rules: requests from a site, ward or source system pinned to
    a version ahead of the weights (each rule's version must be in the registry)."""
    if bool(rule) == clear:
        console.print("[bold red]give --rule (one or more) or --clear[/]")
        raise typer.Exit(2)
    try:
        rules = tuple(parse_rule(text) for text in rule or ())
    except ValueError as exc:
        console.print(f"[bold red]invalid rule:[/] {escape(str(exc))}")
        raise typer.Exit(2) from exc

    def replace(
        current: ModelDeployment, producer: Producer, now: datetime, who: str
    ) -> ModelDeployment:
        return with_rules(current, rules, producer, now, who)

    reason = "rules cleared" if clear else f"{len(rules)} routing rule(s) set"
    _change(connect(context, bootstrap), name, replace, "rules", reason)


def _run_change(kafka: Connection, change: Coroutine[Any, Any, T]) -> T:
    """Run a registry read or change; a refused one (LifecycleError), or a Kafka that cannot be
    reached or refuses the credentials (``run_kafka``), is printed and exits 1."""
    try:
        return run_kafka(kafka, change)
    except LifecycleError as exc:
        console.print(f"[bold red]{exc}[/]")
        raise typer.Exit(1) from exc
