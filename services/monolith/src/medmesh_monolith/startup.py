"""The monolith's start-up, with the services' own code: the routing read once as the router
starts (``medmesh_router.startup``), and one Triton client and stage per model version, each
waited for as a worker waits before consuming (``medmesh_inference.circuit.wait_until_ready``).
An image model's stage prepares its images as a worker does (``medmesh_inference.image_inputs``:
one PACS client of the settings for the process, the model's ``ImageInputs``).
``app.create_app`` runs these in ingest's ``on_start``.

The start waits for Triton only, not for the PACS: one process serves every model, and a PACS
outage must not hold the other models' tasks. An image batch that finds the PACS away waits
behind the worker's probe (Triton and the PACS) in its own batcher (``pipeline``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping

from medmesh_contracts import topics
from medmesh_contracts.events import Producer, utc_now
from medmesh_contracts.modelspec import ModelSpec
from medmesh_inference.batching import WorkerIdentity
from medmesh_inference.circuit import CircuitBackoff, CircuitBreaker, wait_until_ready
from medmesh_inference.image_inputs import ImageInputs
from medmesh_inference.pacs import Pacs
from medmesh_inference.triton import TritonModel
from medmesh_monolith.pipeline import VersionStage
from medmesh_monolith.settings import SERVICE, MonolithSettings
from medmesh_router.startup import apply_registry, seed_unknown
from medmesh_router.state import RouterState
from medmesh_router.topic_reader import StartupReader, read_topic_to_end
from medmesh_runtime.logging import get_logger

log = get_logger("medmesh.monolith")


async def load_routing(
    state: RouterState,
    settings: MonolithSettings,
    producer: Producer,
    read_to_end: StartupReader = read_topic_to_end,
) -> None:
    """The router's start: every registry record in order, then spec weights for the rest."""
    now = utc_now()
    apply_registry(state, await read_to_end(settings, topics.MODELS_REGISTRY), now)
    seed_unknown(state, producer, now, SERVICE)
    log.info("routing loaded", models={m: t.weights for m, t in state.tables.items()})


def triton_models(settings: MonolithSettings, specs: Mapping[str, ModelSpec]) -> list[TritonModel]:
    """One Triton client per model version, built as a worker builds its own."""
    return [
        TritonModel.for_version(settings.triton_grpc_url, version)
        for spec in specs.values()
        for version in spec.versions
    ]


async def ready_stages(
    settings: MonolithSettings,
    specs: Mapping[str, ModelSpec],
    tritons: list[TritonModel],
    producer: Producer,
    pacs: Pacs,
) -> list[VersionStage]:
    """Wait until Triton serves every version (as each worker does before consuming); an image
    model's stages fetch their images from ``pacs``."""
    stages = []
    models = iter(tritons)
    backoff = circuit_backoff(settings)
    for spec in specs.values():
        for version in spec.versions:
            triton = next(models)
            breaker = CircuitBreaker(backoff, time.monotonic)
            await wait_until_ready(
                triton.ready, breaker, asyncio.sleep, model=spec.name, version=version.version
            )
            identity = WorkerIdentity(
                producer,
                version.triton.model,
                str(version.triton.version),
                await triton.device_kind(),
            )
            stages.append(
                VersionStage(
                    spec,
                    version.version,
                    triton.infer,
                    triton.ready,
                    identity,
                    settings.worker_max_batch or version.triton.max_batch_size,
                    # Each version its own, as each worker has (its own fetch concurrency).
                    ImageInputs.for_model(spec, pacs),
                )
            )
    return stages


def circuit_backoff(settings: MonolithSettings) -> CircuitBackoff:
    """The workers' circuit-breaker waits (MEDMESH_CIRCUIT_BACKOFF_INITIAL_MS and _MAX_MS)."""
    return CircuitBackoff(
        settings.circuit_backoff_initial_ms / 1000, settings.circuit_backoff_max_ms / 1000
    )
