"""Issue 17 item 3: scaling out on purpose, N = 1 and 2 instances of each consumer stage.

For each consumer stage (ingest's inbound Kafka consumer, the router, the NEWS2 worker
deterioration-v1 and reporting) the bench stack's instance runs alone (N = 1), then beside a
second instance in the same consumer group (N = 2), each instance pinned to its own core
(``os.sched_setaffinity`` on every thread). Trials run in ABBA order, twice (1, 2, 2, 1, 1, 2,
2, 1), with the same backlog, so a machine that grows busier slows both sides alike.

A trial: the stage's instances stop (SIGSTOP) while a backlog of fresh events is published to
the stage's input topic, continue (SIGCONT), and drain it. Throughput is read from the output
records' own timestamps (CreateTime: set by the stage's producer when it sends), so the bench
client's own delays do not count: the sustained rate is the records stamped after the 10th
percentile of those timestamps and up to the 90th, over the time between them (the start-up of
the drain and its tail, where one partition finishes after the others, are left out). CPU per
event of the instances, the broker and Triton comes from /proc over the drain, and the whole
box's busy share from /proc/stat (this shared machine runs other jobs too).

Only the measured stage runs: every other service of the stack is stopped (SIGSTOP) for the
whole series, while idle, and continued at its end; the measured stage is stopped again once
its trials are over. The stages run downstream first (reporting, worker, router, ingest): the
backlogs a stage leaves on its output topic wait for stages already measured. The router
restarts before its turn, so the results it observed while stopped are not read during its
trials (it follows every result, outside any group). After the series the continued services
work through those backlogs: run the series alone (``medmesh bench --series scaling``). Each
finished stage is also written to ``scaling-stages.json`` in the stack's state folder, so a run
cut short by a time limit keeps what it measured.

Ingest also gets an open-loop HTTP load at fractions of its N = 1 Kafka rate (one instance,
pinned; ``pipeline.run_load``): how far one ingest goes over HTTP. The broker's CPU per event at
each stage, added up, says how far one broker goes.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaProducer

from medmesh_cli.bench.batching import bench_model_task
from medmesh_cli.bench.common import (
    Identify,
    Message,
    Sink,
    bench_task,
    group_state,
    header_value,
    publish_burst,
    run_id,
)
from medmesh_cli.bench.ingest import bench_events, subject_of
from medmesh_cli.bench.pipeline import run_load, vitals_events
from medmesh_cli.bench.router import request_messages
from medmesh_cli.bench.topology import (
    CLIENT,
    UsageMeter,
    process_tree,
    stack_pids,
)
from medmesh_cli.devstack.stack import Stack
from medmesh_contracts import headers as h
from medmesh_contracts import topics
from medmesh_contracts.events import (
    InferenceCompleted,
    Producer,
    RunInference,
    schema_of,
    to_wire,
)
from medmesh_contracts.modelspec import load_specs
from medmesh_inference.settings import WorkerSettings
from medmesh_ingest.settings import IngestSettings
from medmesh_reporting.settings import ReportingSettings
from medmesh_router.settings import RouterSettings

INSTANCES = (1, 2)
# The share of a drain's output records left out at each end (start-up, the last partition's
# tail): the sustained rate is measured between these quantiles of the output timestamps.
DRAIN_TRIM = 0.1
# Backlog bounds: enough records for a drain to settle; few enough to publish in a couple of
# seconds, well inside the stopped instances' session timeouts (reporting's is 6 s).
MIN_BACKLOG, MAX_BACKLOG = 1000, 5000
# Enough polls (up to 500 records each) for the calibration's sustained rate to mean something.
CALIBRATION_EVENTS = 1000
# Unrecorded, before the calibration: the first stage's first trials in smoke runs went at a
# fifth of the later ones, the broker spending twice its later CPU per event (a young JVM).
WARMUP_EVENTS = 500
# The first stage warms the young broker for the whole series: with 500 its N = 1 trials rose
# threefold over the first minutes, and with 3000 the deployment's JVM (C2) still spent three
# times its later CPU per event on the first trials.
FIRST_STAGE_WARMUP_EVENTS = 8000
# Spread over the partitions by key, so each of two instances gets about half.
NEW_INSTANCE_WARMUP_EVENTS = 400
# ABBA repetitions per stage: two give four trials of each N.
REPETITIONS = 2
# Offered HTTP loads against one ingest, as fractions of its N = 1 Kafka rate (HTTP costs it
# more per event, and the load generator's HTTP client shares the cores); the ramp ends at the
# first level it does not sustain. Each level lasts twice the series' seconds.
HTTP_FRACTIONS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.65)
# Open loop: a load over capacity queues, so the last answers wait ever longer: over 2 x 4 s
# an overload of 7 % or more lifts the p99 past this.
HTTP_P99_BOUND_MS = 500.0
WORKER_MODEL, WORKER_VERSION = "deterioration", 1
# NEWS2 7 (high), as deterioration v1 answers the bench's vital signs.
NEWS2_OUTPUTS = {
    "SCORE": (7.0,),
    "RISK_BAND": (3.0,),
    "CONTRIBUTIONS": (2.0, 1.0, 0.0, 1.0, 1.0, 2.0, 0.0),
}


# --- pure: schedule, rates, spreads, efficiency -----------------------------------------------


def abba(first: int, second: int, repetitions: int = 1) -> list[int]:
    """The ABBA order of two variants, ``repetitions`` times: (a, b, b, a, a, b, b, a, ...)."""
    return [first, second, second, first] * repetitions


def sustained_rate(stamps: Sequence[float], trim: float = DRAIN_TRIM) -> float:
    """Records per second between the ``trim`` and ``1 - trim`` quantiles of their timestamps
    (seconds): the records stamped after the first and up to the second, over the time between.
    A stage that sends a poll's records together stamps them alike: counting whole polls after
    the first keeps such a staircase's rate exact. NaN with fewer than 3 records or no time
    between the quantiles."""
    ordered = sorted(stamps)
    if len(ordered) < 3:
        return math.nan
    start = ordered[int(trim * (len(ordered) - 1))]
    end = ordered[math.ceil((1 - trim) * (len(ordered) - 1))]
    if end <= start:
        return math.nan
    return sum(1 for t in ordered if start < t <= end) / (end - start)


@dataclass(frozen=True)
class Spread:
    """The median of some samples and their range."""

    median: float
    low: float
    high: float

    def text(self, digits: int = 0, percent: bool = False) -> str:
        """``median [low-high]``, as numbers or percentages."""
        if math.isnan(self.median):
            return "n/a"
        if percent:
            return f"{self.median:.0%} [{self.low:.0%}-{self.high:.0%}]"
        return f"{self.median:.{digits}f} [{self.low:.{digits}f}-{self.high:.{digits}f}]"


def spread(samples: Sequence[float]) -> Spread:
    """Median and range of the samples that are numbers (all NaN when none is)."""
    values = [s for s in samples if not math.isnan(s)]
    if not values:
        return Spread(math.nan, math.nan, math.nan)
    return Spread(statistics.median(values), min(values), max(values))


def efficiency(one: Sequence[float], two: Sequence[float]) -> Spread:
    """Scaling efficiency throughput(2) / (2 x throughput(1)): of the medians, and its range from
    the least to the most favourable pairing of the samples."""
    single, double = spread(one), spread(two)
    if math.isnan(single.median) or math.isnan(double.median) or single.low <= 0:
        return Spread(math.nan, math.nan, math.nan)
    return Spread(
        double.median / (2 * single.median),
        double.low / (2 * single.high),
        double.high / (2 * single.low),
    )


def cpu_efficiency(one_ms: Sequence[float], two_ms: Sequence[float]) -> float:
    """CPU per event of one instance over that of two (medians): 1 when a second instance
    costs nothing extra per event, the efficiency scaling out has where cores are free."""
    single, double = spread(one_ms).median, spread(two_ms).median
    return single / double if double > 0 else math.nan


# /proc/stat's "cpu" line: user nice system idle iowait irq softirq steal (guest time is already
# in user), in clock ticks since boot.
CpuTimes = tuple[int, ...]


def box_cpu_times(proc: Path = Path("/proc")) -> CpuTimes:
    """The whole machine's CPU times so far (the first eight fields of /proc/stat's cpu line)."""
    first = (proc / "stat").read_text().split("\n", 1)[0].split()
    return tuple(int(v) for v in first[1:9])


def box_shares(before: CpuTimes, after: CpuTimes) -> tuple[float, float]:
    """Between two readings: the share of all cores busy (neither idle nor waiting for I/O)
    and the share stolen by the hypervisor; NaN when no time passed."""
    delta = [a - b for a, b in zip(after, before, strict=True)]
    total = sum(delta)
    if total <= 0:
        return math.nan, math.nan
    idle = delta[3] + delta[4]
    return (total - idle) / total, delta[7] / total


def partition_bound(partitions: int, instances: int) -> float:
    """The best efficiency ``instances`` consumers can reach on ``partitions`` evenly loaded
    partitions: the busiest instance holds ceil(P / N) of them, so the drain takes that long."""
    if partitions < 1 or instances < 1:
        raise ValueError("partitions and instances must be >= 1")
    return partitions / (instances * math.ceil(partitions / instances))


def http_sustained(level: dict[str, Any]) -> bool:
    """An HTTP load level kept up with: every answer 2xx and p99 <= HTTP_P99_BOUND_MS (the
    answered rate, to the last answer, undercounts a short level by that answer's latency)."""
    return bool(level["non_2xx"] == 0 and level["http"]["p99_ms"] <= HTTP_P99_BOUND_MS)


def http_capacity(levels: Sequence[dict[str, Any]]) -> float:
    """The highest offered HTTP load sustained (0 when none was)."""
    return max((lv["offered_per_s"] for lv in levels if http_sustained(lv)), default=0.0)


# --- stages -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stage:
    """One consumer stage: the stack's service, its group, what it reads and writes."""

    label: str
    service: str
    group: str
    source: str
    sinks: tuple[str, ...]
    messages: Callable[[int, str], list[Message]]
    identify: Identify
    # Environment of the second instance on top of the service's (the router's controller runs
    # on one replica only).
    second_env: dict[str, str]


def _correlation(record: Any) -> str | None:
    return header_value(record, h.CORRELATION_ID)


def task_messages(count: int, run: str, specs_dir: Path) -> list[Message]:
    """(id, value, key, headers) of RunInference for deterioration v1, as the router sends them."""
    spec = load_specs(specs_dir)[WORKER_MODEL]
    messages: list[Message] = []
    for i in range(count):
        task = bench_model_task(spec, i, run, WORKER_VERSION)
        headers = [
            (h.CORRELATION_ID, task.correlation_id.encode()),
            (h.SCHEMA, schema_of(RunInference).encode()),
        ]
        messages.append(
            (task.correlation_id, to_wire(task), task.request.patient_pseudonym.encode(), headers)
        )
    return messages


def result_messages(count: int, run: str) -> list[Message]:
    """(id, value, key, headers) of deterioration v1's InferenceCompleted, as a worker sends
    them."""
    messages: list[Message] = []
    for i in range(count):
        task = bench_task(i, run, WORKER_VERSION)
        completed_at = task.routed_at + timedelta(milliseconds=10)
        result = InferenceCompleted(
            correlation_id=task.correlation_id,
            producer=Producer(service="inference", instance="bench"),
            occurred_at=completed_at,
            task=task,
            triton_model=WORKER_MODEL,
            triton_version=str(WORKER_VERSION),
            outputs=NEWS2_OUTPUTS,
            device_kind="KIND_CPU",
            batch_size=1,
            inference_ms=1.0,
            completed_at=completed_at,
        )
        headers = [
            (h.CORRELATION_ID, result.correlation_id.encode()),
            (h.SCHEMA, schema_of(InferenceCompleted).encode()),
        ]
        messages.append(
            (
                result.correlation_id,
                to_wire(result),
                task.request.patient_pseudonym.encode(),
                headers,
            )
        )
    return messages


def consumer_stages(stack: Stack, template: dict[str, Any]) -> list[Stage]:
    """The four consumer stages, in the order they are measured (downstream first)."""
    specs = load_specs(stack.config.specs_dir)
    task_topics = tuple(
        topics.model_task_topic(WORKER_MODEL, v.version) for v in specs[WORKER_MODEL].versions
    )
    worker = WorkerSettings(worker_model=WORKER_MODEL, worker_model_version=WORKER_VERSION)
    return [
        Stage(
            "reporting",
            "reporting",
            str(ReportingSettings.model_fields["reporting_group_id"].default),
            topics.INFERENCE_RESULTS,
            (topics.REPORTS_DIAGNOSTIC,),
            result_messages,
            _correlation,
            {},
        ),
        Stage(
            f"worker {WORKER_MODEL}-v{WORKER_VERSION} (NEWS2)",
            f"{WORKER_MODEL}-v{WORKER_VERSION}",
            worker.group_id,
            topics.model_task_topic(WORKER_MODEL, WORKER_VERSION),
            (topics.INFERENCE_RESULTS, topics.INFERENCE_FAILED),
            lambda count, run: task_messages(count, run, stack.config.specs_dir),
            _correlation,
            {},
        ),
        Stage(
            "router",
            "router",
            str(RouterSettings.model_fields["router_group_id"].default),
            topics.INFERENCE_REQUESTS,
            task_topics,
            request_messages,
            _correlation,
            {"MEDMESH_ROUTER_CONTROLLER": "false"},
        ),
        Stage(
            "ingest (inbound Kafka consumer)",
            "ingest",
            str(IngestSettings.model_fields["ingest_group_id"].default),
            topics.FHIR_INBOUND,
            (topics.INFERENCE_REQUESTS,),
            lambda count, run: bench_events(template, count, run),
            subject_of,
            {},
        ),
    ]


# --- processes: pinning, pausing, group membership --------------------------------------------


def pin(pid: int, cores: set[int]) -> None:
    """Every thread of ``pid`` and its children on ``cores`` (threads started later inherit it)."""
    for process in process_tree(pid):
        try:
            threads = [int(t) for t in os.listdir(f"/proc/{process}/task")]
        except OSError:
            continue
        for thread in threads:
            try:
                os.sched_setaffinity(thread, cores)
            except OSError:
                continue  # the thread ended meanwhile


def bench_cores() -> list[int]:
    """The cores this process may run on, in order (instance i is pinned to the i-th)."""
    return sorted(os.sched_getaffinity(0))


@contextmanager
def stopped(stack: Stack, names: Sequence[str]) -> Iterator[None]:
    """The named services stopped (SIGSTOP) meanwhile, continued (SIGCONT) afterwards."""
    for name in names:
        stack.services[name].signal(signal.SIGSTOP)
    try:
        yield
    finally:
        for name in names:
            stack.services[name].signal(signal.SIGCONT)


async def settle_group(bootstrap: str, group: str, members: int, timeout_s: float = 60.0) -> None:
    """Wait until ``group`` is Stable with ``members`` members; raise naming what it was."""
    deadline = time.monotonic() + timeout_s
    state, count = "unknown", -1
    while time.monotonic() < deadline:
        state, clients = await group_state(bootstrap, group)
        count = len(clients)
        if state == "Stable" and count == members:
            return
        await asyncio.sleep(0.5)
    raise TimeoutError(
        f"group {group} not Stable with {members} members after {timeout_s:.0f}s "
        f"(last: {state}, {count} members)"
    )


# --- one stage --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Trial:
    """One drain of a backlog by N instances."""

    instances: int
    events: int
    missing: int
    publish_s: float
    sustained_per_s: float
    drain_per_s: float
    # CPU ms per drained event: the stage's instances, the broker, Triton, the bench client.
    stage_cpu_ms: float
    broker_cpu_ms: float
    triton_cpu_ms: float
    client_cpu_ms: float
    # The whole box over the drain (/proc/stat, every process, this bench's or not): the share
    # of all cores busy, and the share the hypervisor took away (steal).
    box_busy: float = math.nan
    box_steal: float = math.nan

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


def busy_share(trial: Trial) -> float:
    """The share of its core each instance kept busy while draining (1 = CPU-bound): events
    per second x CPU seconds per event / instances."""
    return trial.sustained_per_s * trial.stage_cpu_ms / 1000 / trial.instances


class _StageRun:
    """One stage's instances, its sink and producer, and its trials."""

    def __init__(self, stack: Stack, stage: Stage) -> None:
        self.stack = stack
        self.stage = stage
        self.names = [stage.service]
        self.stamps: dict[str, float] = {}
        self.sink = Sink(stack.config.bootstrap, stage.sinks, self._stamp)
        self.producer = AIOKafkaProducer(
            bootstrap_servers=stack.config.bootstrap, acks="all", enable_idempotence=True
        )
        self.cores = bench_cores()

    def _stamp(self, record: Any) -> str | None:
        """The record's id, noting its CreateTime (seconds) on first sight."""
        ident = self.stage.identify(record)
        if ident is not None:
            self.stamps.setdefault(ident, record.timestamp / 1000)
        return ident

    def pin_all(self) -> None:
        for index, name in enumerate(self.names):
            pid = self.stack.services[name].pid
            if pid is not None:
                pin(pid, {self.cores[index % len(self.cores)]})

    async def scale_to(self, instances: int) -> None:
        """Start or stop the second instance; wait until the group has settled. A new instance
        is warmed up (not recorded): its first events build caches (fhir.resources' model
        classes, say) and cost it several times more, which a smoke run showed as N = 2 trials
        at half the N = 1 rate right after the start."""
        started = False
        if instances == 2 and len(self.names) == 1:
            extra = await asyncio.to_thread(
                self.stack.start_instance, self.stage.service, 2, self.stage.second_env
            )
            self.names.append(extra)
            started = True
        elif instances == 1 and len(self.names) == 2:
            await asyncio.to_thread(self.stack.stop_instance, self.names.pop())
        self.pin_all()
        await settle_group(self.stack.config.bootstrap, self.stage.group, instances)
        if started:
            await self.trial(NEW_INSTANCE_WARMUP_EVENTS)

    async def trial(self, count: int) -> Trial:
        """Publish ``count`` fresh events while the instances are stopped, then time the drain."""
        messages = self.stage.messages(count, run_id())
        with stopped(self.stack, self.names):
            publishing = time.perf_counter()
            sent = await publish_burst(self.producer, self.stage.source, messages)
            publish_s = time.perf_counter() - publishing
            meter = UsageMeter(stack_pids(self.stack))
            box_before = box_cpu_times()
            started = time.perf_counter()
            resumed = time.time()
        missing = await self.sink.wait_for(sent, timeout_s=60 + count / 20)
        usage = {u.name: u.cpu_cores for u in meter.usage()}
        box = box_shares(box_before, box_cpu_times())
        wall = time.perf_counter() - started
        stamps = [self.stamps[i] for i in sent if i in self.stamps]
        done = len(stamps)

        def per_event_ms(names: Sequence[str]) -> float:
            cores = sum(usage.get(n, 0.0) for n in names)
            return cores * wall / done * 1000 if done else math.nan

        last = max(stamps, default=resumed)
        return Trial(
            instances=len(self.names),
            events=done,
            missing=missing,
            publish_s=publish_s,
            sustained_per_s=sustained_rate(stamps),
            drain_per_s=done / (last - resumed) if last > resumed else math.nan,
            stage_cpu_ms=per_event_ms(self.names),
            broker_cpu_ms=per_event_ms(["kafka"]),
            triton_cpu_ms=per_event_ms(["triton"]),
            client_cpu_ms=per_event_ms([CLIENT]),
            box_busy=box[0],
            box_steal=box[1],
        )


def _restart_router(stack: Stack, name: str) -> None:
    stack.services[name].signal(signal.SIGCONT)
    stack.restart_service(name)


async def measure_stage(
    stack: Stack,
    stage: Stage,
    seconds: float,
    repetitions: int = REPETITIONS,
    warmup: int = WARMUP_EVENTS,
) -> dict[str, Any]:
    """Warm up, size the backlog to about ``seconds`` of draining by one instance, then the ABBA
    trials. The stage's first instance is left running and pinned (the caller stops it)."""
    stage_started = time.perf_counter()
    run = _StageRun(stack, stage)
    if stage.service == "router":
        await asyncio.to_thread(_restart_router, stack, stage.service)
    else:
        stack.services[stage.service].signal(signal.SIGCONT)
    run.pin_all()
    await settle_group(stack.config.bootstrap, stage.group, 1)
    await run.sink.start()
    await run.producer.start()
    try:
        await run.trial(warmup)
        calibration = await run.trial(CALIBRATION_EVENTS)
        rate = calibration.sustained_per_s
        backlog = int(min(MAX_BACKLOG, max(MIN_BACKLOG, rate * seconds if rate > 0 else 0)))
        print(f"{stage.label}: calibration {rate:.0f}/s, backlog {backlog}")
        trials = []
        for instances in abba(*INSTANCES, repetitions):
            await run.scale_to(instances)
            trial = await run.trial(backlog)
            trials.append(trial)
            print(
                f"{stage.label} N={instances}: {trial.sustained_per_s:.1f}/s sustained, "
                f"stage {trial.stage_cpu_ms:.2f} ms/event, broker {trial.broker_cpu_ms:.2f}, "
                f"missing {trial.missing}"
            )
        await run.scale_to(1)
    finally:
        await run.producer.stop()
        await run.sink.stop()
        if len(run.names) == 2:
            await asyncio.to_thread(stack.stop_instance, run.names.pop())
    by_n = {n: [t for t in trials if t.instances == n] for n in INSTANCES}
    partitions = stack.config.partitions
    return {
        "stage": stage.label,
        "service": stage.service,
        "group": stage.group,
        "source": stage.source,
        "partitions": partitions,
        "backlog": backlog,
        "wall_s": time.perf_counter() - stage_started,
        "calibration_per_s": rate,
        "trials": [t.as_dict() for t in trials],
        "per_instances": {
            str(n): {
                "sustained_per_s": asdict(spread([t.sustained_per_s for t in ts])),
                "stage_cpu_ms": asdict(spread([t.stage_cpu_ms for t in ts])),
                "broker_cpu_ms": asdict(spread([t.broker_cpu_ms for t in ts])),
                "triton_cpu_ms": asdict(spread([t.triton_cpu_ms for t in ts])),
                "busy_per_instance": asdict(spread([busy_share(t) for t in ts])),
                "box_busy": asdict(spread([t.box_busy for t in ts])),
            }
            for n, ts in by_n.items()
        },
        "efficiency": asdict(
            efficiency([t.sustained_per_s for t in by_n[1]], [t.sustained_per_s for t in by_n[2]])
        ),
        "cpu_efficiency": cpu_efficiency(
            [t.stage_cpu_ms for t in by_n[1]], [t.stage_cpu_ms for t in by_n[2]]
        ),
        "partition_bound": partition_bound(partitions, 2),
    }


async def ingest_http(
    stack: Stack, template: dict[str, Any], kafka_rate: float, seconds: float
) -> dict[str, Any]:
    """Open-loop HTTP loads against the one (pinned) ingest at fractions of its Kafka rate; its
    downstream stopped, so only the HTTP answer (202 = durably in Kafka) is timed."""
    levels = []
    base = kafka_rate if kafka_rate > 0 else 50.0
    for fraction in HTTP_FRACTIONS:
        rate = max(1.0, round(base * fraction))
        count = max(1, int(rate * seconds * 2))
        events = vitals_events(template, count, count, prefix=f"scale-{run_id()}-http")
        meter = UsageMeter(stack_pids(stack))
        started = time.perf_counter()
        result = await run_load(
            stack.config.ingest_url, stack.config.bootstrap, events, rate, settle_s=0.0
        )
        wall = time.perf_counter() - started
        usage = {u.name: u.cpu_cores for u in meter.usage()}
        answered = result.http.count - result.non_2xx

        per_request_ms = {
            name: usage.get(name, 0.0) * wall / answered * 1000 if answered else math.nan
            for name in ("ingest", "kafka", CLIENT)
        }
        level = {
            "offered_per_s": rate,
            "http": result.http.as_dict(),
            "non_2xx": result.non_2xx,
            "ingest_cpu_ms": per_request_ms["ingest"],
            "broker_cpu_ms": per_request_ms["kafka"],
            "client_cpu_ms": per_request_ms[CLIENT],
        }
        levels.append(level)
        print(
            f"ingest HTTP @ {rate:g}/s: answered {result.http.per_second:.1f}/s, "
            f"p99 {result.http.p99_ms:.0f} ms, non-2xx {result.non_2xx}"
        )
        if not http_sustained(level):
            break  # past capacity: a deeper overload only takes longer
    return {"levels": levels, "capacity_per_s": http_capacity(levels)}


async def run_scaling(
    stack: Stack, template: dict[str, Any], seconds: float = 10.0, repetitions: int = REPETITIONS
) -> dict[str, Any]:
    """Every consumer stage at N = 1 and 2 (ABBA), then ingest over HTTP; the other services
    stopped meanwhile and continued at the end (with backlogs to work through)."""
    if stack.config.partitions < 2:
        raise ValueError("the scaling series needs topics with >= 2 partitions (--partitions)")
    stages = consumer_stages(stack, template)
    every = list(stack.services)
    results = []
    http: dict[str, Any] = {}
    started, load_before = time.perf_counter(), os.getloadavg()
    with stopped(stack, every):
        for index, stage in enumerate(stages):
            warmup = FIRST_STAGE_WARMUP_EVENTS if index == 0 else WARMUP_EVENTS
            result = await measure_stage(stack, stage, seconds, repetitions, warmup)
            results.append(result)
            # A run cut short (a time limit) keeps the stages it finished.
            (stack.config.state_dir / "scaling-stages.json").write_text(
                json.dumps(results, indent=2) + "\n"
            )
            if stage.service == "ingest":
                rate = result["per_instances"]["1"]["sustained_per_s"]["median"]
                http = await ingest_http(stack, template, rate, seconds)
            process = stack.services[stage.service]
            if process.pid is not None:
                pin(process.pid, set(bench_cores()))
            # Stopped again while idle: later stages' trials leave it alone.
            process.signal(signal.SIGSTOP)
    broker = [r["per_instances"]["1"]["broker_cpu_ms"]["median"] for r in results]
    per_pipeline_event = sum(b for b in broker if not math.isnan(b))
    return {
        "cores": bench_cores(),
        "partitions": stack.config.partitions,
        "seconds": seconds,
        "repetitions": repetitions,
        "stages": results[::-1],  # pipeline order: ingest, router, worker, reporting
        "ingest_http": http,
        "broker_cpu_ms_per_pipeline_event": per_pipeline_event,
        # Other jobs on the box take cores too: the load average around the series says so.
        "load_average_1_5_15_min": {"before": load_before, "after": os.getloadavg()},
        "wall_s": time.perf_counter() - started,
    }


# --- Markdown ---------------------------------------------------------------------------------


def _spread_text(data: dict[str, float], digits: int = 0, percent: bool = False) -> str:
    return Spread(**data).text(digits, percent)


def scaling_markdown(report: dict[str, Any]) -> str:
    """The scaling section: per stage N = 1 vs 2 with efficiency, the trials, ingest over HTTP,
    the broker's CPU per event."""
    lines = [
        f"Each instance pinned to one core of {report['cores']}; topics with "
        f"{report['partitions']} partitions; ABBA x {report['repetitions']}; median [range] of "
        "the sustained rate (10th to 90th percentile of the output timestamps). The broker, "
        "Triton and the bench client are not pinned: they share the same cores. Busy = the "
        "share of its core each instance used (1 = CPU-bound); CPU efficiency = stage CPU per "
        "event at N=1 over N=2 (medians); box busy = the share of all cores busy during the "
        "drains, whoever used them (steal included).\n",
        "| stage | backlog | N=1 events/s | N=2 events/s | efficiency | partition bound "
        "| busy per instance N=1 / N=2 | box busy N=1 / N=2 | stage CPU ms/event N=1 / N=2 "
        "| CPU efficiency | broker CPU ms/event N=1 / N=2 | Triton CPU ms/event |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for stage in report["stages"]:
        one, two = stage["per_instances"]["1"], stage["per_instances"]["2"]
        triton = one["triton_cpu_ms"]["median"]
        lines.append(
            f"| {stage['stage']} | {stage['backlog']} "
            f"| {_spread_text(one['sustained_per_s'])} | {_spread_text(two['sustained_per_s'])} "
            f"| {_spread_text(stage['efficiency'], percent=True)} "
            f"| {stage['partition_bound']:.0%} "
            f"| {one['busy_per_instance']['median']:.2f} / "
            f"{two['busy_per_instance']['median']:.2f} "
            f"| {one.get('box_busy', {}).get('median', math.nan):.0%} / "
            f"{two.get('box_busy', {}).get('median', math.nan):.0%} "
            f"| {one['stage_cpu_ms']['median']:.2f} / {two['stage_cpu_ms']['median']:.2f} "
            f"| {stage.get('cpu_efficiency', math.nan):.0%} "
            f"| {one['broker_cpu_ms']['median']:.2f} / {two['broker_cpu_ms']['median']:.2f} "
            f"| {triton:.2f} |"
        )
    lines += [
        "",
        "Trials in run order:",
        "",
        "| stage | N | events | missing | publish s | sustained /s | whole drain /s "
        "| stage ms/event | broker ms/event | Triton ms/event | bench client ms/event "
        "| box busy | steal |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for stage in report["stages"][::-1]:
        for t in stage["trials"]:
            lines.append(
                f"| {stage['stage']} | {t['instances']} | {t['events']} | {t['missing']} "
                f"| {t['publish_s']:.1f} | {t['sustained_per_s']:.1f} | {t['drain_per_s']:.1f} "
                f"| {t['stage_cpu_ms']:.2f} | {t['broker_cpu_ms']:.2f} "
                f"| {t['triton_cpu_ms']:.2f} | {t['client_cpu_ms']:.2f} "
                f"| {t.get('box_busy', math.nan):.0%} | {t.get('box_steal', math.nan):.0%} |"
            )
    http = report.get("ingest_http") or {}
    if http:
        lines += [
            "",
            "One ingest over HTTP (pinned to one core; open loop; downstream stopped):",
            "",
            "| offered /s | answered /s | p50 ms | p99 ms | non-2xx | ingest CPU ms/request "
            "| broker CPU ms/request | load generator CPU ms/request |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for level in http["levels"]:
            lines.append(
                f"| {level['offered_per_s']:g} | {level['http']['per_second']:.1f} "
                f"| {level['http']['p50_ms']:.1f} | {level['http']['p99_ms']:.1f} "
                f"| {level['non_2xx']} | {level['ingest_cpu_ms']:.2f} "
                f"| {level['broker_cpu_ms']:.2f} | {level.get('client_cpu_ms', math.nan):.2f} |"
            )
        lines.append(
            f"\nCapacity of one ingest over HTTP (every answer 2xx, p99 <= "
            f"{HTTP_P99_BOUND_MS:g} ms): {http['capacity_per_s']:g}/s."
        )
    load = report.get("load_average_1_5_15_min")
    if load:
        lines.append(
            f"\nLoad average (1, 5, 15 min) before the series {load['before']}, after "
            f"{load['after']}; the series took {report.get('wall_s', math.nan):.0f} s."
        )
    total = report["broker_cpu_ms_per_pipeline_event"]
    lines.append(
        f"\nBroker CPU per pipeline event (the four stages' N=1 medians added): {total:.2f} ms, "
        f"so about {1000 / total:.0f} events/s per broker core.\n"
        if total > 0
        else "\nBroker CPU per pipeline event: not measured.\n"
    )
    return "\n".join(lines)
