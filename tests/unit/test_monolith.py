"""The monolith topology's in-process stages, and the pure parts of the topology benchmark."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Mapping
from datetime import datetime
from pathlib import Path

import numpy as np
import numpy.typing as npt
from aiokafka.errors import KafkaTimeoutError
from opentelemetry import trace

from medmesh_cli.bench.stats import summarize
from medmesh_cli.bench.topology import Level, capacity, hop_figures, machine_details
from medmesh_cli.devstack.stack import StackConfig, service_specs
from medmesh_cli.ops.waterfall import Span
from medmesh_contracts import headers as h
from medmesh_contracts import topics
from medmesh_contracts.events import Producer, to_wire, utc_now
from medmesh_contracts.lifecycle import ModelDeployment, deploy_version, seed_deployment
from medmesh_contracts.modelspec import load_spec
from medmesh_inference.batching import RetryPolicy, WorkerIdentity
from medmesh_inference.triton import TritonCallError
from medmesh_monolith.pipeline import InProcessPipeline, Pending, VersionStage
from medmesh_monolith.settings import MonolithSettings
from medmesh_monolith.startup import load_routing
from medmesh_reporting.handling import ReportHandler
from medmesh_router.readiness import Readiness
from medmesh_router.routing import route
from medmesh_router.settings import RouterSettings
from medmesh_router.state import RouterState
from medmesh_router.topic_reader import Consumed, StartupReader
from tests.conformance.report_checks import check_report_bundle
from tests.factories import DETERIORATION_OUTPUTS, make_inputs, make_request

SPECS = Path(__file__).resolve().parents[2] / "deploy" / "models"
SPEC = load_spec(SPECS / "deterioration.yaml")
PRODUCER = Producer(service="monolith", instance="test")
POISON_HEART_RATE = 999.0


class FakeTriton:
    """Answers the deterioration outputs for every row; a poison heart rate is refused."""

    def __init__(self) -> None:
        self.batch_sizes: list[int] = []

    async def infer(
        self, inputs: Mapping[str, npt.NDArray[np.generic]]
    ) -> Mapping[str, npt.NDArray[np.generic]]:
        batch = inputs["VITALS"]
        self.batch_sizes.append(batch.shape[0])
        if (batch == POISON_HEART_RATE).any():
            raise TritonCallError("StatusCode.INVALID_ARGUMENT: bad row", transient=False)
        n = batch.shape[0]
        outputs = DETERIORATION_OUTPUTS[1]
        return {
            name: np.tile(np.array(values, dtype=np.float32), (n, 1))
            for name, values in outputs.items()
        }

    async def ready(self) -> bool:
        return True


Published = list[tuple[str, bytes | None, bytes, dict[str, str]]]


def _pipeline(triton: FakeTriton, published: Published) -> InProcessPipeline:
    state = RouterState({SPEC.name: SPEC}, Readiness())
    state.apply(
        seed_deployment(SPEC.name, SPEC.routing.weights, PRODUCER, utc_now(), "t"), utc_now()
    )
    tracer = trace.get_tracer("test")

    async def publish(
        topic: str, key: bytes | None, value: bytes, headers: Mapping[str, str]
    ) -> None:
        published.append((topic, key, value, dict(headers)))

    stages = [
        VersionStage(
            SPEC,
            v.version,
            triton.infer,
            triton.ready,
            WorkerIdentity(PRODUCER, v.triton.model, str(v.triton.version), "KIND_CPU"),
            v.triton.max_batch_size,
        )
        for v in SPEC.versions
    ]
    return InProcessPipeline(
        state=state,
        stages=stages,
        reports=ReportHandler({SPEC.name: SPEC}, PRODUCER, tracer),
        publish=publish,
        router_producer=PRODUCER,
        policy=RetryPolicy(max_attempts=2, initial_backoff_s=0.0),
        tracer=tracer,
        linger_s=0.01,
    )


async def _until(published: Published, count: int) -> None:
    async with asyncio.timeout(5):
        while len(published) < count:  # noqa: ASYNC110 -- polls a list the pipeline fills
            await asyncio.sleep(0.01)


async def test_requests_are_routed_batched_and_reported_in_process() -> None:
    """Accepted requests are routed, scored in one Triton call and published as report Bundles."""
    triton = FakeTriton()
    published: Published = []
    pipeline = _pipeline(triton, published)
    for i in range(3):
        await pipeline.accept(make_request(correlation_id=f"c-{i}", patient_pseudonym=f"p-{i}"))
    pipeline.start()
    try:
        await _until(published, 3)
    finally:
        await pipeline.stop()
    assert triton.batch_sizes == [3]
    assert {p[0] for p in published} == {topics.REPORTS_DIAGNOSTIC}
    assert sorted(p[3][h.CORRELATION_ID] for p in published) == ["c-0", "c-1", "c-2"]
    assert sorted(p[1] or b"" for p in published) == [b"p-0", b"p-1", b"p-2"]
    assert all(check_report_bundle(json.loads(p[2])) == [] for p in published)


async def test_a_poison_request_goes_to_the_failed_topic_alone() -> None:
    """A task Triton refuses becomes an InferenceFailed on the failed topic; its neighbour a report."""
    triton = FakeTriton()
    published: Published = []
    pipeline = _pipeline(triton, published)
    poison = make_inputs({"heart_rate": POISON_HEART_RATE})
    await pipeline.accept(make_request(correlation_id="bad", inputs=poison))
    await pipeline.accept(make_request(correlation_id="good", patient_pseudonym="p-2"))
    pipeline.start()
    try:
        await _until(published, 2)
    finally:
        await pipeline.stop()
    by_id = {p[3][h.CORRELATION_ID]: p for p in published}
    assert by_id["bad"][0] == topics.INFERENCE_FAILED
    assert by_id["bad"][3][h.SCHEMA].startswith("medmesh.InferenceFailed/")
    assert by_id["good"][0] == topics.REPORTS_DIAGNOSTIC


async def test_a_batch_kafka_refused_is_served_again() -> None:
    """When Kafka refuses a report, the batch is served again and the report still goes out."""
    triton = FakeTriton()
    published: Published = []
    pipeline = _pipeline(triton, published)
    pipeline.unavailable_pause_s = 0.0
    accepting = pipeline.publish
    refusals = [KafkaTimeoutError()]

    async def flaky(
        topic: str, key: bytes | None, value: bytes, headers: Mapping[str, str]
    ) -> None:
        if refusals:
            raise refusals.pop()
        await accepting(topic, key, value, headers)

    pipeline.publish = flaky
    await pipeline.accept(make_request(correlation_id="c-1"))
    pipeline.start()
    try:
        await _until(published, 1)
    finally:
        await pipeline.stop()
    assert triton.batch_sizes == [1, 1]
    assert [p[3][h.CORRELATION_ID] for p in published] == ["c-1"]


async def test_take_batch_takes_what_is_queued_up_to_the_batch_size() -> None:
    """A batcher takes at most the batch size, then the rest on its next turn."""
    pipeline = _pipeline(FakeTriton(), [])
    queue: asyncio.Queue[Pending] = asyncio.Queue()
    for i in range(5):
        request = make_request(correlation_id=f"c-{i}")
        task = route(request, pipeline.state.tables, PRODUCER, utc_now()).primary.task
        queue.put_nowait(Pending(task, b"k", trace.set_span_in_context(trace.INVALID_SPAN)))
    assert len(await pipeline.take_batch(queue, 3)) == 3
    assert len(await pipeline.take_batch(queue, 3)) == 2


def _registry(*deployments: ModelDeployment) -> StartupReader:
    """A start-up reader whose registry topic holds ``deployments`` (other topics: empty)."""

    async def read(
        _settings: RouterSettings,
        topic: str,
        since: datetime | None = None,
        apply: Callable[[Consumed], None] | None = None,
    ) -> list[Consumed]:
        if topic != topics.MODELS_REGISTRY:
            return []
        return [Consumed(0, offset, to_wire(d)) for offset, d in enumerate(deployments)]

    return read


async def test_routing_loads_the_registry_then_seeds_the_rest_as_the_router_does() -> None:
    """The monolith starts from the registry's records (the router's start-up code) and seeds
    the models the registry lacks from their spec weights, as written by "monolith"."""
    specs = {SPEC.name: SPEC}
    known = deploy_version(
        seed_deployment(SPEC.name, {1: 100}, PRODUCER, utc_now(), "t"), 2, PRODUCER, utc_now(), "t"
    )
    settings = MonolithSettings(model_specs_dir=SPECS)

    registered = RouterState(specs, Readiness(require_heartbeats=False))
    await load_routing(registered, settings, PRODUCER, _registry(known))
    assert registered.deployments[SPEC.name] == known

    seeded = RouterState(specs, Readiness(require_heartbeats=False))
    await load_routing(seeded, settings, PRODUCER, _registry())
    assert seeded.deployments[SPEC.name].weights == SPEC.routing.weights
    assert seeded.deployments[SPEC.name].changed_by == "monolith"


def test_monolith_topology_is_one_process_on_ingests_port() -> None:
    """The stack's monolith topology starts one process, medmesh_monolith, on ingest's port."""
    config = StackConfig(topology="monolith")
    assert [(s.name, s.module, s.port) for s in service_specs(config)] == [
        ("monolith", "medmesh_monolith", config.ports.ingest)
    ]


def _level(offered: float, achieved_count: int, p99: float, missing: int = 0) -> Level:
    tail = max(1, achieved_count // 20)
    latencies = [10.0] * (achieved_count - tail) + [p99] * tail
    return Level(
        topology="t",
        label="",
        offered_per_s=offered,
        end_to_end=summarize("e2e", latencies, 10.0),
        http=summarize("http", [], 10.0),
        in_pipeline=summarize("in", [], 10.0),
        missing=missing,
        non_2xx=0,
        usage=[],
        hops=[],
    )


def test_capacity_is_the_highest_sustained_offered_load() -> None:
    """Capacity ignores levels that lost reports, fell behind or had an unbounded p99."""
    levels = [
        _level(10, 100, 50),
        _level(20, 200, 80),
        _level(40, 300, 90),  # 30/s achieved of 40 offered: not sustained
        _level(30, 300, 5000),  # p99 over the bound
        _level(25, 250, 60, missing=1),
    ]
    assert capacity(levels) == 20
    assert capacity([]) == 0


def _span(trace_id: str, name: str, start_ms: float, end_ms: float, cid: str = "") -> Span:
    attributes = {"messaging.message.conversation_id": cid} if cid else {}
    return Span(
        trace_id,
        name + str(start_ms),
        None,
        name,
        "",
        "s",
        int(start_ms * 1e6),
        int(end_ms * 1e6),
        attributes,
    )


def test_hop_figures_split_waits_per_hop_and_time_in_pipeline() -> None:
    """Each hop's wait runs from its publish start to the next process start, per request."""
    spans = [
        _span("t1", "POST /fhir", 0, 10),
        _span("t1", "medmesh.inference.requests publish", 5, 7, cid="c1"),
        _span("t1", "medmesh.inference.requests process", 9, 12),
        _span("t1", f"{topics.REPORTS_DIAGNOSTIC} publish", 20, 21),
        _span("t2", "medmesh.inference.requests publish", 0, 1, cid="other"),
        _span("t2", "medmesh.inference.requests process", 50, 51),
    ]
    figures, in_pipeline = hop_figures(spans, ["c1"])
    assert [(f.hop, f.count, f.wait_p50_ms, f.work_p50_ms) for f in figures] == [
        ("medmesh.inference.requests", 1, 4.0, 3.0)
    ]
    assert in_pipeline == [20.0]


def test_machine_details_read_cpu_model_and_memory(tmp_path: Path) -> None:
    """The CPU model and total memory come from /proc/cpuinfo and /proc/meminfo."""
    (tmp_path / "cpuinfo").write_text("processor\t: 0\nmodel name\t: Test CPU @ 2 GHz\n")
    (tmp_path / "meminfo").write_text("MemTotal:       24576000 kB\n")
    assert machine_details(tmp_path) == {"cpu_model": "Test CPU @ 2 GHz", "memory_gib": 23.4}
