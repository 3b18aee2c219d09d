"""Issue 17: the inference worker's own costs, in process (no stack), each change beside what it
replaced, in one run.

- **compression**: aiokafka's record-batch builder (what every producer runs) on one ECG
  RunInference of about 19 kB: lz4 at aiokafka's own LZ4-HC level 9 against medmesh's
  ``LZ4_LEVEL``, snappy and zstd (aiokafka's level 3) beside them; microseconds per message
  and the batch's size.
- **telemetry**: the worker's handler per NEWS2 row (decoding the task, ``score_tasks`` on a
  fake Triton, outcome records, spans exported to a JSON-lines file as ``medmesh up`` runs them,
  metrics), in batches of 1 and 64: "before" replays the per-row telemetry the handler had
  before issue 17 (a process and a publish span per row, every metric point per row), "now" is
  ``medmesh_inference.batch_handler.BatchHandler``, "floor" makes the same records without spans
  or metrics.
- **linger**: the real ``TaskWorker`` loop over an in-memory Kafka, its Triton call taking
  ``serve_ms`` and each transaction ``commit_ms``: tasks arriving one by one at a low and a
  moderate and a high rate (Poisson) and a burst, with the fixed linger (before) and the adaptive one
  (now); per-task latency from its arrival to its commit, and batches made.

Timings of the first two are medians of interleaved rounds (before, now, floor, then again), so
a busy machine slows every series alike; the ratios are what to read. Run with
``python -m medmesh_cli.bench.worker`` (``--quick`` for a short run, ``--json PATH``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import numpy.typing as npt
from aiokafka import TopicPartition
from aiokafka.record import default_records
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

from medmesh_cli.bench.batching import bench_model_task
from medmesh_cli.bench.common import bench_task
from medmesh_cli.bench.memory_kafka import FakeKafka, FakeRecord
from medmesh_cli.bench.stats import Summary, summarize
from medmesh_cli.devstack.paths import repo_root
from medmesh_contracts import topics
from medmesh_contracts.events import (
    InferenceCompleted,
    Producer,
    RunInference,
    schema_of,
    to_wire,
    utc_now,
)
from medmesh_contracts.modelspec import ModelSpec, load_specs
from medmesh_inference.batch_handler import BatchHandler
from medmesh_inference.batching import (
    Outcome,
    RetryPolicy,
    WorkerIdentity,
    destination,
    score_tasks,
)
from medmesh_inference.circuit import CircuitBackoff, CircuitBreaker
from medmesh_inference.outcomes import OUTCOME_TOPICS, outcome_record
from medmesh_inference.worker import LoopTiming, Scored, TaskWorker
from medmesh_runtime.kafka import LZ4_LEVEL, set_lz4_level
from medmesh_runtime.logging import configure_logging
from medmesh_runtime.metrics import configure_metrics, meter
from medmesh_runtime.telemetry import (
    JsonLinesSpanExporter,
    configure_tracing,
    consumer_span,
    exporting,
    publish_headers,
)
from medmesh_runtime.transactional import OutgoingRecord, encoded_headers

TASKS = topics.model_task_topic("deterioration", 1)
IDENTITY = WorkerIdentity(
    Producer(service="inference", instance="bench"), "deterioration", "1", "KIND_CPU"
)


def _median_us(samples: Sequence[float]) -> float:
    return statistics.median(samples) * 1e6


def _interleaved(series: Mapping[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Each series' seconds per unit, ``rounds`` times, the series taking turns."""
    samples: dict[str, list[float]] = {name: [] for name in series}
    for _ in range(rounds):
        for name, run in series.items():
            samples[name].append(run())
    return samples


# --- compression ------------------------------------------------------------------------------


def _build_batch(value: bytes, codec: int) -> bytes:
    builder = default_records.DefaultRecordBatchBuilder(2, codec, 0, -1, -1, -1, 1 << 20)
    builder.append(0, timestamp=None, key=b"pseudo-bench", value=value, headers=[])
    return bytes(builder.build())


def run_compression(rounds: int, messages: int) -> dict[str, Any]:
    """Microseconds per ECG task message through aiokafka's record-batch builder, per codec."""
    spec = load_specs(repo_root() / "deploy" / "models")["ecg-rhythm"]
    value = to_wire(bench_model_task(spec, 1, "compression"))
    batch = default_records.DefaultRecordBatch

    def timed(codec: int, lz4_level: int | None = None) -> Callable[[], float]:
        def run() -> float:
            if lz4_level is not None:
                set_lz4_level(lz4_level)
            started = time.perf_counter()
            for _ in range(messages):
                _build_batch(value, codec)
            elapsed = (time.perf_counter() - started) / messages
            set_lz4_level(LZ4_LEVEL)
            return elapsed

        return run

    codecs = {
        "lz4 level 9 (aiokafka, before)": (batch.CODEC_LZ4, 9),
        f"lz4 level {LZ4_LEVEL} (medmesh, now)": (batch.CODEC_LZ4, LZ4_LEVEL),
        "snappy": (batch.CODEC_SNAPPY, None),
        "zstd level 3 (aiokafka)": (batch.CODEC_ZSTD, None),
        "none": (batch.CODEC_NONE, None),
    }
    samples = _interleaved({n: timed(c, lvl) for n, (c, lvl) in codecs.items()}, rounds)
    sizes = {}
    for name, (codec, level) in codecs.items():
        if level is not None:
            set_lz4_level(level)
        sizes[name] = len(_build_batch(value, codec))
    set_lz4_level(LZ4_LEVEL)
    rows: list[dict[str, Any]] = [
        {"codec": name, "us_per_message": _median_us(samples[name]), "batch_bytes": sizes[name]}
        for name in codecs
    ]
    before, now = rows[0]["us_per_message"], rows[1]["us_per_message"]
    return {
        "message_bytes": len(value),
        "rounds": rounds,
        "messages_per_round": messages,
        "rows": rows,
        "before_over_now": before / now if now else float("nan"),
    }


def compression_markdown(report: dict[str, Any]) -> str:
    """The compression table and its before/now ratio."""
    lines = [
        f"One ECG RunInference of {report['message_bytes']} bytes through aiokafka's "
        f"record-batch builder (median of {report['rounds']} rounds of "
        f"{report['messages_per_round']}).\n",
        "| codec | us per message | batch bytes |",
        "|---|---|---|",
    ]
    lines += [
        f"| {r['codec']} | {r['us_per_message']:.1f} | {r['batch_bytes']} |" for r in report["rows"]
    ]
    lines.append(
        f"\nlz4 level 9 / level {LZ4_LEVEL}: **{report['before_over_now']:.1f}x** the time."
    )
    return "\n".join(lines) + "\n"


# --- telemetry --------------------------------------------------------------------------------


class _FakeTriton:
    """NEWS2-shaped answers at once (the Triton call is not what is measured here)."""

    async def infer(
        self, inputs: Mapping[str, npt.NDArray[np.generic]]
    ) -> Mapping[str, npt.NDArray[np.generic]]:
        rows = next(iter(inputs.values())).shape[0]
        return {
            "SCORE": np.full((rows, 1), 7.0, dtype=np.float32),
            "RISK_BAND": np.full((rows, 1), 3, dtype=np.int32),
            "CONTRIBUTIONS": np.zeros((rows, 7), dtype=np.float32),
        }

    async def ready(self) -> bool:
        return True

    async def device_kind(self) -> str:
        return "KIND_CPU"


class _LegacyMetrics:
    """The worker's metrics as recorded before issue 17: every point per row."""

    def __init__(self) -> None:
        self._labels = {"model": "deterioration", "model_version": "1"}
        m = meter("medmesh.bench.before")
        self._outcomes = m.create_counter("medmesh.inference.requests")
        self._batch = m.create_histogram("medmesh.inference.batch_size")
        self._triton = m.create_histogram("medmesh.inference.triton_duration")
        self._age = m.create_histogram("medmesh.inference.request_age")

    def record(self, outcomes: Sequence[Outcome]) -> None:
        now = utc_now()
        self._batch.record(len(outcomes), self._labels)
        timed = False
        for outcome in outcomes:
            if isinstance(outcome, InferenceCompleted):
                kind = "completed"
                if not timed:
                    self._triton.record(outcome.inference_ms, self._labels)
                    timed = True
            else:
                kind = outcome.error_kind
            self._outcomes.add(1, {**self._labels, "outcome": kind})
            age = (now - outcome.task.request.received_at).total_seconds() * 1000
            self._age.record(age, self._labels)


@dataclass
class _Handlers:
    """The three ways of handling one batch that the telemetry series compare."""

    spec: ModelSpec
    tracer: trace.Tracer
    now: BatchHandler
    legacy_metrics: _LegacyMetrics = field(default_factory=_LegacyMetrics)

    async def score(self, tasks: Sequence[RunInference]) -> list[Outcome]:
        triton = self.now.triton
        return await score_tasks(
            tasks, self.spec, triton.infer, IDENTITY, RetryPolicy(), utc_now, triton.ready
        )

    async def before(self, tasks: Sequence[RunInference], sources: Sequence[Any]) -> list[Scored]:
        """The handler before issue 17: batch span, per-row metrics, and per row a process span
        and a publish span."""
        received_ns = time.time_ns()
        with self.tracer.start_as_current_span(
            "inference.batch", attributes={"medmesh.batch_size": len(tasks)}
        ) as batch_span:
            outcomes = await self.score(tasks)
        self.legacy_metrics.record(outcomes)
        link = trace.Link(batch_span.get_span_context())
        scored = []
        for outcome, record in zip(outcomes, sources, strict=True):
            with consumer_span(
                self.tracer,
                record,
                links=[link],
                start_time=received_ns,
                attributes={
                    "messaging.message.conversation_id": outcome.correlation_id,
                    "medmesh.batch_size": len(tasks),
                },
            ):
                topic = OUTCOME_TOPICS[destination(outcome)]
                headers = publish_headers(
                    self.tracer, topic, outcome.correlation_id, schema_of(type(outcome))
                )
                out = OutgoingRecord(topic, record.key, to_wire(outcome), encoded_headers(headers))
                scored.append(Scored(outcome, out))
        return scored

    async def floor(self, tasks: Sequence[RunInference], sources: Sequence[Any]) -> list[Scored]:
        """The same records with no span and no metric."""
        outcomes = await self.score(tasks)
        return [
            Scored(outcome, outcome_record(outcome, record.key))
            for outcome, record in zip(outcomes, sources, strict=True)
        ]


def _news2_records(tracer: trace.Tracer, count: int) -> list[FakeRecord]:
    """NEWS2 tasks as the router publishes them: each in a trace of its own."""
    records = []
    for i in range(count):
        task = bench_task(i, "telemetry")
        with tracer.start_as_current_span("router.route"):
            headers = publish_headers(tracer, TASKS, task.correlation_id, schema_of(RunInference))
        records.append(
            FakeRecord(TASKS, 0, i, task.request.patient_pseudonym.encode(), to_wire(task),
                   encoded_headers(headers))
        )  # fmt: skip
    return records


Handle = Callable[[Sequence[RunInference], Sequence[Any]], Awaitable[list[Scored]]]


def _per_row(
    loop: asyncio.AbstractEventLoop,
    handle: Handle,
    batches: list[list[FakeRecord]],
    rows: int,
    flush: Callable[[], object],
) -> Callable[[], float]:
    """Seconds per row of decoding and handling ``batches`` over and over, ``rows`` rows, and
    of exporting the spans that made (``flush``: each series pays for its own)."""

    async def run() -> None:
        done = 0
        while done < rows:
            for batch in batches:
                tasks = [RunInference.model_validate_json(r.value or b"") for r in batch]
                await handle(tasks, batch)
                done += len(batch)

    def measure() -> float:
        started = time.perf_counter()
        loop.run_until_complete(run())
        flush()
        return (time.perf_counter() - started) / rows

    return measure


def run_telemetry(rounds: int, rows: int, span_file: Path) -> dict[str, Any]:
    """Microseconds per NEWS2 row of the worker's handler, per batch size and series."""
    provider: TracerProvider = configure_tracing("inference", "bench", None)
    provider.add_span_processor(exporting(JsonLinesSpanExporter(span_file)))
    configure_metrics("inference", "bench")
    tracer = provider.get_tracer("medmesh.inference")
    spec = load_specs(repo_root() / "deploy" / "models")["deterioration"]
    triton = cast(Any, _FakeTriton())  # the TritonModel calls BatchHandler makes
    handler = BatchHandler(spec, spec.version(1), triton, IDENTITY, RetryPolicy(), tracer)
    handlers = _Handlers(spec, tracer, handler)
    records = _news2_records(tracer, 64)
    flush = provider.force_flush
    result: dict[str, Any] = {"rounds": rounds, "rows_per_round": rows, "batches": []}
    loop = asyncio.new_event_loop()
    try:
        for size in (1, 64):
            batches = [records[i : i + size] for i in range(0, 64, size)]

            series = {
                "before: per-row spans and metrics": _per_row(
                    loop, handlers.before, batches, rows, flush
                ),
                "now: BatchHandler": _per_row(loop, handler.handle, batches, rows, flush),
                "floor: no telemetry": _per_row(loop, handlers.floor, batches, rows, flush),
            }
            for warm_up in series.values():
                warm_up()
            samples = _interleaved(series, rounds)
            us = {name: _median_us(values) for name, values in samples.items()}
            before, now, floor = us.values()
            result["batches"].append(
                {
                    "batch_size": size,
                    "us_per_row": us,
                    "before_over_now": before / now,
                    "telemetry_before_over_now": (before - floor) / (now - floor)
                    if now > floor
                    else float("nan"),
                }
            )
    finally:
        loop.close()
        provider.force_flush()
    return result


def telemetry_markdown(report: dict[str, Any]) -> str:
    """Per-row costs by batch size, and the before/now ratios."""
    lines = [
        f"The worker's handler per NEWS2 row, fake Triton, spans to a JSON-lines file (median of "
        f"{report['rounds']} rounds of {report['rows_per_round']} rows).\n",
        "| batch | before us/row | now us/row | floor us/row | before / now "
        "| telemetry before / now |",
        "|---|---|---|---|---|---|",
    ]
    for b in report["batches"]:
        before, now, floor = b["us_per_row"].values()
        lines.append(
            f"| {b['batch_size']} | {before:.1f} | {now:.1f} | {floor:.1f} "
            f"| {b['before_over_now']:.2f}x | {b['telemetry_before_over_now']:.2f}x |"
        )
    lines.append(
        "\nTelemetry before / now: (before - floor) / (now - floor), the spans' and metrics' "
        "own cost."
    )
    return "\n".join(lines) + "\n"


# --- linger -----------------------------------------------------------------------------------

_TP = TopicPartition(TASKS, 0)
_GROUP = "bench-linger"


@dataclass
class _Timings:
    """When each task's record arrived and when its offset was committed (perf_counter)."""

    arrived_at: list[float] = field(default_factory=list)
    committed_at: dict[int, float] = field(default_factory=dict)
    committed: int = 0

    def commit(self, offsets: Mapping[tuple[str, TopicPartition], int]) -> None:
        """A transaction committed: its offsets are the tasks' commit time."""
        next_offset = offsets.get((_GROUP, _TP))
        if next_offset is not None:
            now = time.perf_counter()
            for offset in range(self.committed, next_offset):
                self.committed_at[offset] = now
            self.committed = next_offset


async def _serve_arrivals(
    gaps_s: Sequence[float], *, adaptive: bool, serve_s: float, commit_s: float
) -> tuple[list[float], int]:
    """Tasks arriving after ``gaps_s`` each, through a TaskWorker: each task's latency (ms, from
    its arrival to its commit) and the batches made."""
    timings = _Timings()
    kafka = FakeKafka(commit_delay_s=commit_s, on_commit=timings.commit)
    spec = load_specs(repo_root() / "deploy" / "models")["deterioration"]

    async def infer(
        inputs: Mapping[str, npt.NDArray[np.generic]],
    ) -> Mapping[str, npt.NDArray[np.generic]]:
        await asyncio.sleep(serve_s)
        return await _FakeTriton().infer(inputs)

    async def handle(tasks: Sequence[RunInference], sources: Sequence[Any]) -> list[Scored]:
        outcomes = await score_tasks(tasks, spec, infer, IDENTITY, RetryPolicy(), utc_now)
        return [Scored(o, outcome_record(o, r.key)) for o, r in zip(outcomes, sources, strict=True)]

    async def ready() -> bool:
        return True

    async def nothing() -> None:
        return None

    def dead_letter(record: Any, reason: str) -> OutgoingRecord:
        raise AssertionError(f"no task is dead-lettered in the benchmark: {reason}")

    worker = TaskWorker(
        lambda: kafka.consumer(_GROUP),
        kafka.producer,
        topic=TASKS,
        group_id=_GROUP,
        max_batch=64,
        handle=handle,
        dead_letter=dead_letter,
        probe=ready,
        on_ready=nothing,
        breaker=CircuitBreaker(CircuitBackoff(), time.monotonic),
        timing=LoopTiming(linger_s=0.02, adaptive_linger=adaptive),
        clock=time.monotonic,
    )
    tasks = [to_wire(bench_task(i, "linger")) for i in range(len(gaps_s))]
    running = asyncio.create_task(worker.run())
    while not worker.consuming:  # noqa: ASYNC110 -- the worker exposes a flag, not an event
        await asyncio.sleep(0.001)
    # Each task is appended once its arrival time has come (several at a time at high rates:
    # the event loop wakes about every millisecond at best).
    due, elapsed = [], 0.0
    for gap in gaps_s:
        elapsed += gap
        due.append(elapsed)
    started, sent = time.perf_counter(), 0
    while sent < len(tasks):
        now = time.perf_counter() - started
        while sent < len(tasks) and due[sent] <= now:
            kafka.append(TASKS, tasks[sent], key=b"pseudo-bench")
            timings.arrived_at.append(time.perf_counter())
            sent += 1
        if sent < len(tasks):
            await asyncio.sleep(max(0.0, due[sent] - (time.perf_counter() - started)))
    deadline = time.monotonic() + 60
    while timings.committed < len(tasks) and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.002)
    worker.stop()
    await asyncio.wait_for(running, 10)
    await worker.close()
    latencies = [
        (timings.committed_at[i] - timings.arrived_at[i]) * 1000
        for i in range(len(tasks))
        if i in timings.committed_at
    ]
    return latencies, worker.stats.batches


def run_linger(
    low_tasks: int,
    moderate_tasks: int,
    high_tasks: int,
    burst_tasks: int,
    serve_ms: float,
    commit_ms: float,
) -> dict[str, Any]:
    """Fixed against adaptive linger, same arrivals, per load."""
    rng = random.Random(17)  # noqa: S311 -- reproducible arrival times, not a secret
    loads = {
        "low, 20 tasks/s": [rng.expovariate(20) for _ in range(low_tasks)],
        "moderate, 200 tasks/s": [rng.expovariate(200) for _ in range(moderate_tasks)],
        "high, 4000 tasks/s": [rng.expovariate(4000) for _ in range(high_tasks)],
        "burst, all at once": [0.0] * burst_tasks,
    }
    rows = []
    for load, gaps in loads.items():
        for adaptive in (False, True):
            name = f"{load}: {'adaptive (now)' if adaptive else 'fixed (before)'}"
            started = time.perf_counter()
            latencies, batches = asyncio.run(
                _serve_arrivals(
                    gaps, adaptive=adaptive, serve_s=serve_ms / 1000, commit_s=commit_ms / 1000
                )
            )
            summary: Summary = summarize(name, latencies, time.perf_counter() - started)
            rows.append(
                {
                    "load": load,
                    "adaptive": adaptive,
                    "summary": summary.as_dict(),
                    "batches": batches,
                    "missing": len(gaps) - len(latencies),
                }
            )
    return {"serve_ms": serve_ms, "commit_ms": commit_ms, "linger_ms": 20.0, "rows": rows}


def linger_markdown(report: dict[str, Any]) -> str:
    """Latency and batches per load, fixed beside adaptive, with the p50 ratio."""
    lines = [
        f"The TaskWorker loop on an in-memory Kafka; each Triton call takes {report['serve_ms']} "
        f"ms and each transaction {report['commit_ms']} ms; linger {report['linger_ms']:.0f} ms. "
        "Latency from a task's arrival to its commit.\n",
        "| load | linger | tasks | batches | p50 ms | p90 ms | p99 ms | missing |",
        "|---|---|---|---|---|---|---|---|",
    ]
    p50: dict[str, dict[bool, float]] = {}
    for r in report["rows"]:
        s = r["summary"]
        p50.setdefault(r["load"], {})[r["adaptive"]] = s["p50_ms"]
        lines.append(
            f"| {r['load']} | {'adaptive' if r['adaptive'] else 'fixed'} | {s['count']} "
            f"| {r['batches']} | {s['p50_ms']:.2f} | {s['p90_ms']:.2f} | {s['p99_ms']:.2f} "
            f"| {r['missing']} |"
        )
    lines.append("")
    for load, by in p50.items():
        if by.get(True):
            lines.append(f"- {load}: p50 fixed / adaptive **{by[False] / by[True]:.2f}x**")
    return "\n".join(lines) + "\n"


# --- the whole series -------------------------------------------------------------------------


def run_worker_path(quick: bool = False) -> dict[str, Any]:
    """The three comparisons, in this order, in one process (the handler's per-batch log lines
    are silenced: WARNING and above only)."""
    configure_logging("bench", "WARNING")
    rounds = 3 if quick else 7
    with tempfile.TemporaryDirectory() as tmp:
        return {
            "compression": run_compression(rounds, 20 if quick else 100),
            "telemetry": run_telemetry(rounds, 256 if quick else 1024, Path(tmp) / "spans.jsonl"),
            "linger": run_linger(
                low_tasks=40 if quick else 150,
                moderate_tasks=200 if quick else 800,
                high_tasks=2000 if quick else 4000,
                burst_tasks=640 if quick else 2000,
                serve_ms=3.0,
                commit_ms=5.0,
            ),
        }


def worker_path_markdown(report: dict[str, Any]) -> str:
    """The three sections."""
    return (
        "### lz4 level (aiokafka's 9 against medmesh's)\n\n"
        + compression_markdown(report["compression"])
        + "\n### Telemetry per batch\n\n"
        + telemetry_markdown(report["telemetry"])
        + "\n### Adaptive linger\n\n"
        + linger_markdown(report["linger"])
    )


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m medmesh_cli.bench.worker``: print the Markdown (and write JSON if asked)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds and tasks")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON here")
    args = parser.parse_args(argv)
    report = run_worker_path(args.quick)
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    sys.stdout.write(worker_path_markdown(report))


if __name__ == "__main__":
    main()
