"""The router's start-up over what was read: registry records into the state, then a seed from
its spec's weights for each model the registry does not know; heartbeats into readiness; a
progressing rollout's figures read back. The reads are passed in (``topic_reader``), so this
does no I/O of its own. The registry part is shared by the router (``load``) and the monolith
(``medmesh_monolith.startup``), so both start from the same routing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Protocol, TypeVar

from pydantic import BaseModel, ValidationError

from medmesh_contracts import topics
from medmesh_contracts.catalog import SpecCatalog
from medmesh_contracts.events import InferenceCompleted, InferenceFailed, Producer, WorkerHeartbeat
from medmesh_contracts.lifecycle import (
    LifecycleDecision,
    ModelDeployment,
    decision,
    rollout_active,
    seed_deployment,
)
from medmesh_router.analysis import Analysis
from medmesh_router.settings import RouterSettings
from medmesh_router.state import RouterState
from medmesh_router.topic_reader import Consumed, StartupReader
from medmesh_runtime.logging import get_logger

Parsed = TypeVar("Parsed", bound=BaseModel)
log = get_logger("medmesh.router")


class StartRecord(Protocol):
    """A record read at start (``topic_reader.Consumed``), with where it was in its topic."""

    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def value(self) -> bytes | None: ...


def parse_record(model: type[Parsed], record: StartRecord, *, owned: bool = True) -> Parsed | None:
    """A record read at start as ``model``; None for tombstones and bad records. A bad record of
    a topic the router owns is logged; results and failures (``owned=False``) are reporting's,
    whose dead letter already names them, as for the followers."""
    if not record.value:
        return None
    try:
        return model.model_validate_json(record.value)
    except ValidationError as exc:
        if owned:
            log.warning("record ignored at start", offset=record.offset, error=str(exc))
        return None


def spec_learner(catalog: SpecCatalog) -> Callable[[ModelDeployment], None]:
    """What to do with a registry record naming a version the specs lack: read the specs again
    (a hot deploy added it), so the version is routed without a restart; logged when not."""

    def learn(deployment: ModelDeployment) -> None:
        for v in deployment.versions:
            if not catalog.learn(deployment.model, v.version):
                log.warning(
                    "registry names a model version the specs do not declare; not routed",
                    model=deployment.model,
                    model_version=v.version,
                    spec_error=catalog.last_error,
                )

    return learn


def apply_registry(
    state: RouterState,
    records: Iterable[StartRecord],
    now: datetime,
    learn: Callable[[ModelDeployment], None] | None = None,
) -> dict[int, int]:
    """Apply the registry's records in log order (``learn`` sees each deployment first); the
    last offset read per partition, tombstones and bad records included."""
    last: dict[int, int] = {}
    for record in records:
        last[record.partition] = record.offset
        deployment = parse_record(ModelDeployment, record)
        if deployment is not None:
            if learn is not None:
                learn(deployment)
            state.apply(deployment, now)
    return last


def seed_unknown(
    state: RouterState, producer: Producer, now: datetime, changed_by: str
) -> list[ModelDeployment]:
    """Seed every model of the specs the state has no deployment for from its spec's
    ``routing.weights`` (revision 1), applied to the state; the seeds, in spec order."""
    seeds = []
    for name, spec in state.specs.items():
        if name in state.deployments:
            continue
        seeded = seed_deployment(name, spec.routing.weights, producer, now, changed_by)
        state.apply(seeded, now)
        seeds.append(seeded)
    return seeds


# How far back a restarted router reads results and failures to rebuild a rollout step's
# figures: bounds its start time on a busy pipeline (a step longer than this restarts counting).
FIGURES_REBUILD_MAX = timedelta(hours=1)


@dataclass
class Loaded:
    """What the start read: the last offset per (topic, partition), which the followers skip,
    and the seeds with their audits, published once Kafka is connected."""

    offsets: dict[tuple[str, int], int] = field(default_factory=dict)
    seeds: list[tuple[ModelDeployment, LifecycleDecision]] = field(default_factory=list)


async def load(
    state: RouterState,
    analysis: Analysis,
    settings: RouterSettings,
    producer: Producer,
    read: StartupReader,
    now: datetime,
    learn: Callable[[ModelDeployment], None] | None = None,
) -> Loaded:
    """Rebuild the state from the registry and heartbeats (readiness as of ``now``: a restart
    audits no change), a progressing rollout's figures, then seed models the registry lacks."""
    loaded = Loaded()
    registry = await read(settings, topics.MODELS_REGISTRY)
    for partition, offset in apply_registry(state, registry, now, learn=learn).items():
        loaded.offsets[(topics.MODELS_REGISTRY, partition)] = offset
    for record in await read(settings, topics.MODELS_STATUS):
        loaded.offsets[(topics.MODELS_STATUS, record.partition)] = record.offset
        beat = parse_record(WorkerHeartbeat, record)
        if beat is not None:
            state.readiness.observe(beat)
    state.refresh(now)
    await rebuild_figures(state, analysis, settings, read, now)
    changed_by = f"router:{settings.instance_id}"
    for seeded in seed_unknown(state, producer, now, changed_by):
        audit = decision(
            None, seeded, "seed", seeded.changed_by, "registry empty: spec weights", producer, now
        )
        loaded.seeds.append((seeded, audit))
    log.info(
        "registry loaded",
        models={m: d.weights for m, d in state.deployments.items()},
        servable={
            f"{m}-v{v.version}": state.servable(m, v.version, now)
            for m, d in state.deployments.items()
            for v in d.versions
        },
    )
    return loaded


async def rebuild_figures(
    state: RouterState,
    analysis: Analysis,
    settings: RouterSettings,
    read: StartupReader,
    now: datetime,
) -> None:
    """Results and failures since the earliest step of a progressing rollout began, so a
    restart neither forgets a step's evidence nor makes it start counting again. Best effort:
    a read that runs out of time leaves the figures partial (logged), it does not stop the
    router from starting."""
    starts = [
        d.rollout.step_started_at
        for d in state.deployments.values()
        if rollout_active(d) and d.rollout.step_started_at is not None
    ]
    if not starts:
        return
    since = max(min(starts), now - FIGURES_REBUILD_MAX)
    read_count = [0]

    def completed(record: Consumed) -> None:
        event = parse_record(InferenceCompleted, record, owned=False)
        if event is not None:
            analysis.completed(event)
            read_count[0] += 1

    def failed(record: Consumed) -> None:
        event = parse_record(InferenceFailed, record, owned=False)
        if event is not None:
            analysis.failed(event)
            read_count[0] += 1

    sources = (
        (topics.INFERENCE_RESULTS, completed),
        (topics.INFERENCE_SHADOW_RESULTS, completed),
        (topics.INFERENCE_FAILED, failed),
    )
    try:
        for topic, apply in sources:
            await read(settings, topic, since=since, apply=apply)
    except TimeoutError:
        log.warning(
            "rollout figures only partly rebuilt: reading them took too long",
            since=since.isoformat(),
            records=read_count[0],
        )
        return
    log.info("rollout figures rebuilt", since=since.isoformat(), records=read_count[0])
