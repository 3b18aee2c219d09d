"""The in-process floor of the topology bench (issue 17): the same libraries doing the same work
per NEWS2 event in one process, with no HTTP, no Kafka, no Triton and no spans.

Per vitals Bundle: ingest's ``IngestService.handle`` (parse and validate with fhir.resources,
extract, merge into the patient's readings; the state updates it would publish serialized as
they would be), the router's ``route`` over a ``RouterState`` seeded from the specs, the
worker's ``score_tasks`` with NEWS2 computed by the Triton model's own ``news2`` (numpy, in
this process), and reporting's ``ReportHandler.for_result`` (the report Bundle's bytes). One
event at a time (batches of one), so the floor is not flattered by batching.

The services' and the monolith's CPU per event are compared against this figure (issue 17's
targets: services <= 3.5x, monolith <= 2x).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import numpy.typing as npt
from opentelemetry import trace

from medmesh_cli.devstack.paths import repo_root
from medmesh_cli.pyfiles import load_file
from medmesh_contracts.events import (
    FhirVersion,
    InferenceCompleted,
    PatientReadingsUpdated,
    Producer,
    SourceContext,
    to_wire,
    utc_now,
)
from medmesh_contracts.modelspec import load_specs
from medmesh_inference.batching import RetryPolicy, WorkerIdentity, score_tasks
from medmesh_ingest.pseudonym import Pseudonymizer
from medmesh_ingest.readings import ReadingsStore
from medmesh_ingest.service import Context, IngestService, Outgoing
from medmesh_ingest.validation import Limits
from medmesh_monolith.pipeline import ResultRecord
from medmesh_reporting.handling import ReportHandler
from medmesh_router.readiness import Readiness
from medmesh_router.routing import route
from medmesh_router.startup import seed_unknown
from medmesh_router.state import RouterState
from medmesh_runtime.logging import configure_logging

MODEL = "deterioration"
# The deployed default (MEDMESH_READINGS_LOOKBACK_MINUTES).
_LOOKBACK = timedelta(minutes=240)
FHIR_VERSION: FhirVersion = "R4B"


class _Floor:
    """The stages' objects, built once (as a process builds them at start)."""

    def __init__(self) -> None:
        root = repo_root()
        self.specs = load_specs(root / "deploy" / "models")
        self.spec = self.specs[MODEL]
        version = self.spec.versions[0]
        model = load_file(
            root
            / "deploy"
            / "triton"
            / "models"
            / MODEL
            / str(version.triton.version)
            / "model.py",
            "medmesh_bench_floor_news2",
        )
        self._news2 = model.news2
        self._outputs: tuple[str, ...] = tuple(model.OUTPUTS)
        self.requests: list[Outgoing] = []
        self.states: list[bytes] = []
        self.ingest = IngestService(
            specs=self.specs,
            pseudonymize=Pseudonymizer(b"bench-floor-key-0123456789"),
            producer=Producer(service="ingest", instance="floor"),
            store=ReadingsStore(),
            publish=self._publish,
            limits=Limits(),
            lookback=_LOOKBACK,
        )
        self.context = Context(
            SourceContext(channel="http", fhir_version=FHIR_VERSION), FHIR_VERSION
        )
        self.state = RouterState(self.specs, Readiness())
        router = Producer(service="router", instance="floor")
        seed_unknown(self.state, router, utc_now(), "floor")
        self.router = router
        self.identity = WorkerIdentity(
            Producer(service="inference", instance="floor"),
            version.triton.model,
            str(version.triton.version),
            "cpu",
        )
        self.reports = ReportHandler(
            self.specs,
            Producer(service="reporting", instance="floor"),
            trace.NoOpTracer(),
        )
        self.policy = RetryPolicy()

    async def _publish(
        self,
        outgoing: Sequence[Outgoing],
        published: Sequence[PatientReadingsUpdated],
        payloads: int,
    ) -> list[int | None]:
        self.requests.extend(outgoing)
        self.states.extend(to_wire(state) for state in published)
        return [None] * len(published)

    async def infer(
        self, inputs: Mapping[str, npt.NDArray[np.generic]]
    ) -> Mapping[str, npt.NDArray[np.generic]]:
        """NEWS2 as the Triton model computes it, in this process."""
        arrays = self._news2(next(iter(inputs.values())))
        return dict(zip(self._outputs, arrays, strict=True))

    async def event(self, raw: bytes) -> int:
        """One Bundle through every stage; the number of report records made."""
        self.requests.clear()
        await self.ingest.handle(raw, self.context, datetime.now(UTC))
        made = 0
        for outgoing in self.requests:
            routed = route(outgoing.request, self.state.tables, self.router, utc_now())
            outcomes = await score_tasks(
                [routed.primary.task], self.spec, self.infer, self.identity, self.policy, utc_now
            )
            for outcome in outcomes:
                if isinstance(outcome, InferenceCompleted):
                    records = self.reports.for_result(
                        ResultRecord(outcome, outgoing.request.patient_pseudonym.encode()),
                        outcome,
                    )
                    made += len(records)
        return made


async def _measure(events: Sequence[bytes], warmup: int) -> dict[str, Any]:
    floor = _Floor()
    for raw in events[:warmup]:
        await floor.event(raw)
    measured = events[warmup:]
    started_cpu, started_wall = time.process_time(), time.perf_counter()
    reports = 0
    for raw in measured:
        reports += await floor.event(raw)
    cpu = time.process_time() - started_cpu
    wall = time.perf_counter() - started_wall
    return {
        "events": len(measured),
        "reports": reports,
        "cpu_ms_per_event": cpu / max(len(measured), 1) * 1000,
        "wall_ms_per_event": wall / max(len(measured), 1) * 1000,
    }


def floor_cpu_per_event(
    events: Sequence[bytes], warmup: int = 50, service_logging: bool = True
) -> dict[str, Any]:
    """CPU ms per event of the in-process floor over ``events`` (the first ``warmup`` not
    counted: lazily built FHIR model classes, pydantic caches). Run it in its own process: the
    figure is this process's CPU time. With ``service_logging`` the stages log as a service
    does (``configure_logging``: JSON lines), into /dev/null instead of a log file."""
    if not service_logging:
        return asyncio.run(_measure(events, warmup))
    root = logging.getLogger()
    # Restored afterwards: the process goes on to send the loads, whose HTTP client would
    # otherwise log every request (CPU on the cores the pipeline is measured on).
    handlers, level = list(root.handlers), root.level
    configure_logging("floor")
    added = [handler for handler in root.handlers if handler not in handlers]
    with open(os.devnull, "w") as sink:
        for handler in added:
            if isinstance(handler, logging.StreamHandler):
                handler.setStream(sink)
        try:
            return asyncio.run(_measure(events, warmup))
        finally:
            for handler in added:
                root.removeHandler(handler)
                handler.close()
            root.handlers = handlers
            root.setLevel(level)
