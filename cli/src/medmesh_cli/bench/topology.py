"""Issues 9 and 17: services vs monolith on one broker and one Triton, measured honestly.

Both topologies run the same stage code (one process per service, or ``medmesh_monolith``) on
the bench stack's broker (run with a production JVM: G1, full tiered compilation) and Triton.
The open-loop HTTP load (``pipeline.run_load``: sends scheduled by the clock, latency from the
planned send time to the report on medmesh.reports.diagnostic) runs in a process of its own,
whose CPU is reported apart and never counted as the pipeline's. Every comparison is
interleaved A B B A (services, monolith, monolith, services), so neither always runs first:

1. capacity by bisection on sustained throughput (after ``Plan.first_warmup_s`` of load on the
   fresh stack, so that no probe pays the broker JIT's warm-up): one ABBA block of probes, each held
   ``Plan.probe_s`` (30 s in the full form), doubling from ``Plan.start_rate`` until a probe
   fails, then halving the bracket; sustained = every report back, achieved >= 95 % of offered,
   p99 <= ``P99_BOUND_MS``; a probe is given up as failed as soon as its p99 can no longer be
   within the bound (``pipeline.p99_beyond``), so an overload costs seconds, not minutes of
   queued sends; the pipeline drains to idle after every probe;
2. fixed loads: ``Plan.repetitions`` ABBA blocks of a quarter and a half of each topology's
   capacity; end-to-end percentiles at half capacity are pooled over the blocks (at least
   ``Plan.latency_events``), per-phase percentiles are given as median and range;
3. CPU per event per process, marginal: /proc utime+stime at the two rates of each phase,
   Δcores / Δreports per second (an idle process's constant cost cancels out), median and range
   over the phases; Triton's python-backend children and Kafka reported beside;
4. per hop: from the half-capacity levels' traces, the wait of one topic traversal (a stage's
   publish span start to the next stage's process span start) and the next stage's work;
5. the in-process floor (``floor``: the same libraries doing the same work in one process),
   so that issue 17's ratio targets are computed within one run;
6. with ``profile_to``: one more half-capacity level per topology under py-spy (``profile``),
   in its first fixed phase, not counted in the figures.

The stack is left in the services topology.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import multiprocessing as mp
import os
import re
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from medmesh_cli.bench.common import cpu_seconds_from_stat
from medmesh_cli.bench.floor import floor_cpu_per_event
from medmesh_cli.bench.pipeline import PipelineResult, run_load
from medmesh_cli.bench.profile import Profile, finish_profiles, start_profiles
from medmesh_cli.bench.stats import Summary, percentile, summarize
from medmesh_cli.devstack.stack import Stack, Topology
from medmesh_cli.ops.waterfall import CONVERSATION_ID, Hop, Span, hops, parse_spans
from medmesh_contracts import topics

SERVICES: Topology = "services"
MONOLITH: Topology = "monolith"
TOPOLOGIES: tuple[Topology, ...] = (SERVICES, MONOLITH)
ACHIEVED_SHARE = 0.95
P99_BOUND_MS = 1000.0
# The BatchSpanProcessor exports every 5 s: wait that long before reading a phase's spans.
SPAN_FLUSH_S = 6.0
# A probe's reports still missing this long after its last send fail it (drain() then waits
# for the backlog to clear before the next level).
PROBE_SETTLE_S = 10.0
# Drained: the pipeline uses at most this many cores more than when it was idle.
DRAIN_MARGIN_CORES = 0.1
WARMUP_S = 4.0
CLIENT = "bench client (load generator)"
PROC = Path("/proc")


# --- processes: CPU and peak memory from /proc ------------------------------------------------


def parent_pids(proc: Path = PROC) -> dict[int, int]:
    """Every process's parent pid, read from /proc."""
    parents = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may hold spaces and parentheses, so split after ")".
        parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    return parents


def descendants(root: int, parents: Mapping[int, int]) -> list[int]:
    """``root`` and every process below it, given each pid's parent pid."""
    children: dict[int, list[int]] = {}
    for pid, parent in parents.items():
        children.setdefault(parent, []).append(pid)
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def process_tree(pid: int, proc: Path = PROC) -> list[int]:
    """``pid`` and all its descendants (Triton's python-backend stubs, say)."""
    return descendants(pid, parent_pids(proc))


def tree_cpu_s(pids: Iterable[int], proc: Path = PROC) -> float:
    """User + system CPU seconds used so far by the given processes."""
    total = 0.0
    ticks = os.sysconf("SC_CLK_TCK")
    for pid in pids:
        try:
            total += cpu_seconds_from_stat((proc / str(pid) / "stat").read_text(), ticks)
        except OSError:
            continue
    return total


def peak_rss_mb(pids: Iterable[int], proc: Path = PROC) -> float:
    """Sum of the processes' peak resident set sizes (VmHWM), in MiB."""
    total_kb = 0
    for pid in pids:
        try:
            status = (proc / str(pid) / "status").read_text()
        except OSError:
            continue
        match = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
        if match:
            total_kb += int(match.group(1))
    return total_kb / 1024


def stack_pids(stack: Stack) -> dict[str, int]:
    """The stack's processes by name: its services (or the monolith), Kafka and Triton."""
    named = {name: p.pid for name, p in stack.services.items()}
    named["kafka"] = stack.kafka.process.pid
    named["triton"] = stack.triton.pid
    return {name: pid for name, pid in named.items() if pid is not None}


@dataclass(frozen=True)
class Usage:
    """One process (with its children) during one load level."""

    name: str
    cpu_cores: float
    peak_rss_mb: float


class UsageMeter:
    """CPU seconds of every process at the start of a level, for the usage at its end."""

    def __init__(self, pids: dict[str, int], client_pid: int | None = None) -> None:
        self._trees = {name: process_tree(pid) for name, pid in pids.items()}
        # The load generator itself (not its tree: the stack's processes may be its children):
        # this process unless the load runs in a process of its own.
        self._trees[CLIENT] = [client_pid or os.getpid()]
        self._cpu = {name: tree_cpu_s(tree) for name, tree in self._trees.items()}
        self._started = time.perf_counter()

    def usage(self) -> list[Usage]:
        """Average cores used since the start, and peak RSS, per process."""
        wall = max(time.perf_counter() - self._started, 1e-9)
        return [
            Usage(name, (tree_cpu_s(tree) - self._cpu[name]) / wall, peak_rss_mb(tree))
            for name, tree in self._trees.items()
        ]


# --- per-hop figures from the traces ----------------------------------------------------------


@dataclass(frozen=True)
class HopFigures:
    """One hop over a level's requests: the wait before the next stage, and its work."""

    hop: str
    count: int
    wait_p50_ms: float
    wait_p99_ms: float
    work_p50_ms: float


def trace_hops(trace: Sequence[Span]) -> list[Hop]:
    """The trace's Kafka hops (``waterfall.hops``, which also pairs a process span with the
    upstream stage's process span when no publish span exists)."""
    return hops(trace)


def hop_figures(
    spans: Sequence[Span], correlation_ids: Iterable[str]
) -> tuple[list[HopFigures], list[float]]:
    """Per-hop figures of the given requests' traces, and each request's time in the pipeline
    (its HTTP span's start to its report's publish span's start)."""
    traces: dict[str, list[Span]] = {}
    by_request: dict[str, set[str]] = {}
    for span in spans:
        traces.setdefault(span.trace_id, []).append(span)
        for key in (CONVERSATION_ID, "medmesh.correlation_id"):
            value = span.attributes.get(key)
            if value:
                by_request.setdefault(str(value), set()).add(span.trace_id)
    waits: dict[str, list[float]] = {}
    works: dict[str, list[float]] = {}
    in_pipeline: list[float] = []
    report_publish = f"{topics.REPORTS_DIAGNOSTIC} publish"
    for correlation_id in correlation_ids:
        for trace_id in by_request.get(correlation_id, ()):
            trace = sorted(traces[trace_id], key=lambda s: s.start_ns)
            for hop in trace_hops(trace):
                waits.setdefault(hop.topic, []).append(hop.wait_ms)
                works.setdefault(hop.topic, []).append(hop.work_ms)
            post = next((s for s in trace if s.name.startswith("POST ")), None)
            out = next((s for s in trace if s.name == report_publish), None)
            if post is not None and out is not None:
                in_pipeline.append((out.start_ns - post.start_ns) / 1e6)
    figures = []
    for hop_name, values in waits.items():
        ordered, work = sorted(values), sorted(works[hop_name])
        figures.append(
            HopFigures(
                hop_name,
                len(ordered),
                percentile(ordered, 50),
                percentile(ordered, 99),
                percentile(work, 50),
            )
        )
    return figures, in_pipeline


def spans_since(path: Path, offset: int) -> list[Span]:
    """The spans appended to a span file after ``offset`` bytes."""
    if not path.exists():
        return []
    with path.open("rb") as spans:
        spans.seek(offset)
        text = spans.read().decode(errors="replace")
    return parse_spans(line for line in text.splitlines() if line.endswith("}"))


def _file_size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


# --- the series -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Level:
    """One offered load against one topology."""

    topology: str
    label: str
    offered_per_s: float
    end_to_end: Summary
    http: Summary
    in_pipeline: Summary
    missing: int
    non_2xx: int
    usage: list[Usage]
    hops: list[HopFigures]
    # Wall seconds the usage was measured over (the load and the wait for its reports).
    wall_s: float = 0.0
    repetition: int = 0
    # Seconds into the load at which a capacity probe was given up (None: it ran to the end).
    abandoned_after_s: float | None = None

    @property
    def sustained(self) -> bool:
        """Everything reported, at >= 95 % of the offered rate, with p99 under the bound."""
        e2e = self.end_to_end
        return (
            self.abandoned_after_s is None
            and self.missing == 0
            and self.non_2xx == 0
            and e2e.per_second >= ACHIEVED_SHARE * self.offered_per_s
            and e2e.p99_ms <= P99_BOUND_MS
        )

    @property
    def reports_per_s(self) -> float:
        """Reports that arrived per second of the measured wall time."""
        return self.end_to_end.count / self.wall_s if self.wall_s > 0 else math.nan

    def cores(self, names: Iterable[str] | None = None) -> float:
        """Cores used by the named processes (all but the load generator when None)."""
        wanted = set(names) if names is not None else None
        return sum(
            u.cpu_cores
            for u in self.usage
            if (u.name in wanted if wanted is not None else u.name != CLIENT)
        )

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {**asdict(self), "sustained": self.sustained}


def capacity(levels: Iterable[Level]) -> float:
    """The highest offered load sustained (0 when none was)."""
    return max((lv.offered_per_s for lv in levels if lv.sustained), default=0.0)


@dataclass(frozen=True)
class Plan:
    """How long and how often the topology series measures (``quick``: a smoke run)."""

    repetitions: int = 3
    # Each capacity probe holds its load this long (an overload must show as one).
    probe_s: float = 30.0
    # Bisection probes per capacity phase: the capacity block is one ABBA, so each topology
    # gets twice this many (six: from 30/s, 30 60 120 90 75 67.5 when 60 is the last sustained).
    probes_per_phase: int = 3
    start_rate: float = 30.0
    # End-to-end latencies at half capacity, pooled over a topology's fixed-load phases.
    latency_events: int = 2000
    # Time budget of the whole series from its start (None: none); the fixed-load phases
    # that would start past it are skipped and the report says so.
    budget_s: float | None = None
    # A fixed-load level lasts no longer than this (fewer pooled latencies at a low capacity).
    max_level_s: float = 45.0
    # Before the first probe, the fresh stack (a cold broker JVM above all) is loaded this long
    # at ``start_rate / 2``: without it the first probe of a run paid the JIT's warm-up (p50
    # 506 ms at 30/s, against 80 ms at 29.1/s later in the same run).
    first_warmup_s: float = 60.0

    @classmethod
    def quick(cls, budget_s: float | None = None) -> Plan:
        """A short form: one ABBA repetition, 8 s probes, 200 pooled latencies."""
        return cls(1, 8.0, 2, 20.0, 200, budget_s, 15.0, 10.0)


class Bisection:
    """Capacity by bisection on sustained throughput: doubling from ``start`` until a probe
    fails, then halving the bracket between the highest sustained and the lowest failed rate."""

    def __init__(self, start: float) -> None:
        self.start = start
        self.sustained = 0.0
        self.failed: float | None = None

    def next_rate(self) -> float:
        """The next rate to probe."""
        if self.failed is None:
            return self.sustained * 2 if self.sustained else self.start
        return round((self.sustained + self.failed) / 2, 1)

    def record(self, rate: float, sustained: bool) -> None:
        """A probe's verdict."""
        if sustained:
            self.sustained = max(self.sustained, rate)
        else:
            self.failed = rate if self.failed is None else min(self.failed, rate)

    def as_dict(self) -> dict[str, Any]:
        """The bracket: capacity is its lower end."""
        return {"sustained_per_s": self.sustained, "failed_per_s": self.failed}


def abba(first: Topology, second: Topology, repetitions: int) -> list[tuple[int, Topology]]:
    """(repetition, topology) in ABBA order: A B B A, repeated; neither always runs first."""
    return [(rep, t) for rep in range(repetitions) for t in (first, second, second, first)]


def marginal_ms_per_event(low: Level, high: Level, names: Iterable[str]) -> float:
    """CPU ms per extra event of the named processes between two rates: Δcores / Δreports/s."""
    extra = high.reports_per_s - low.reports_per_s
    if not extra or math.isnan(extra) or extra <= 0:
        return math.nan
    return (high.cores(names) - low.cores(names)) / extra * 1000


def per_event_ms(cores: float, events_per_s: float) -> float:
    """CPU ms per event of ``cores`` used at ``events_per_s`` (NaN when nothing arrived)."""
    if math.isnan(events_per_s) or events_per_s <= 0:
        return math.nan
    return cores / events_per_s * 1000


def spread(values: Iterable[float]) -> dict[str, float]:
    """Median and range of repeated figures (NaNs dropped)."""
    kept = sorted(v for v in values if not math.isnan(v))
    if not kept:
        return {"median": math.nan, "min": math.nan, "max": math.nan, "n": 0}
    return {"median": statistics.median(kept), "min": kept[0], "max": kept[-1], "n": len(kept)}


def medmesh_processes(levels: Iterable[Level]) -> list[str]:
    """The medmesh processes measured (not Kafka, Triton or the load generator)."""
    names = {u.name for lv in levels for u in lv.usage}
    return sorted(names - {"kafka", "triton", CLIENT})


# --- the load generator, in its own process ---------------------------------------------------


def _load_level(
    ingest_url: str,
    bootstrap: str,
    events: list[bytes],
    rate: float,
    settle_s: float,
    give_up_past_ms: float | None,
) -> PipelineResult:
    return asyncio.run(
        run_load(
            ingest_url, bootstrap, events, rate, settle_s=settle_s, give_up_past_ms=give_up_past_ms
        )
    )


class LoadGenerator:
    """One spawned process that sends the open-loop loads (and measures the floor), so that its
    CPU is its own: not the pipeline's, and not the orchestrating process's."""

    def __init__(self) -> None:
        self._pool = ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn"))
        self.pid = self._pool.submit(os.getpid).result()

    async def load(
        self,
        ingest_url: str,
        bootstrap: str,
        events: list[bytes],
        rate: float,
        settle_s: float,
        give_up_past_ms: float | None = None,
    ) -> PipelineResult:
        """``pipeline.run_load`` in the generator's process."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._pool, _load_level, ingest_url, bootstrap, events, rate, settle_s, give_up_past_ms
        )

    async def floor(self, events: list[bytes]) -> dict[str, Any]:
        """``floor.floor_cpu_per_event`` in the generator's process (the stack idle)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, floor_cpu_per_event, events)

    def close(self) -> None:
        """Stop the process."""
        self._pool.shutdown(cancel_futures=True)


# --- levels and phases ------------------------------------------------------------------------


@dataclass
class _Pending:
    topology: str
    label: str
    offered: float
    result: PipelineResult
    meter_usage: list[Usage]
    wall_s: float
    repetition: int


def _pipeline_pids(stack: Stack) -> dict[str, int]:
    return {n: p for n, p in stack_pids(stack).items() if n not in ("kafka", "triton")}


async def _level(
    stack: Stack,
    loadgen: LoadGenerator,
    label: str,
    rate: float,
    events: list[bytes],
    repetition: int,
    settle_s: float = 20.0,
    profile_to: Path | None = None,
    give_up_past_ms: float | None = None,
) -> _Pending:
    meter = UsageMeter(stack_pids(stack), client_pid=loadgen.pid)
    started = time.perf_counter()
    profiles: list[Profile] = []
    if profile_to is not None:
        duration = max(1, int(len(events) / rate))
        profiles = start_profiles(_pipeline_pids(stack), duration, profile_to)
    result = await loadgen.load(
        stack.config.ingest_url, stack.config.bootstrap, events, rate, settle_s, give_up_past_ms
    )
    usage = meter.usage()
    wall = time.perf_counter() - started
    if profiles:
        await asyncio.to_thread(finish_profiles, profiles)
    return _Pending(stack.config.topology, label, rate, result, usage, wall, repetition)


def _finish(pending: _Pending, spans: Sequence[Span]) -> Level:
    result = pending.result
    figures, in_pipeline = hop_figures(spans, result.correlation_ids) if spans else ([], [])
    return Level(
        topology=pending.topology,
        label=pending.label,
        offered_per_s=pending.offered,
        end_to_end=result.end_to_end,
        http=result.http,
        in_pipeline=summarize(
            f"in pipeline @ {pending.offered:g}/s", in_pipeline, result.end_to_end.seconds
        ),
        missing=result.missing,
        non_2xx=result.non_2xx,
        usage=pending.meter_usage,
        hops=figures,
        wall_s=pending.wall_s,
        repetition=pending.repetition,
        abandoned_after_s=result.abandoned_after_s,
    )


async def pipeline_cores(stack: Stack, seconds: float = 2.0) -> float:
    """Cores the pipeline's processes use over the next ``seconds``."""
    trees = [process_tree(pid) for pid in _pipeline_pids(stack).values()]
    before = sum(tree_cpu_s(t) for t in trees)
    await asyncio.sleep(seconds)
    return (sum(tree_cpu_s(t) for t in trees) - before) / seconds


async def drain(stack: Stack, idle_cores: float, max_s: float = 120.0) -> float:
    """Wait until the pipeline's processes are back to ``idle_cores`` (a probe past capacity
    leaves a backlog the next level would inherit); the seconds waited."""
    started = time.perf_counter()
    while time.perf_counter() - started < max_s:
        if await pipeline_cores(stack) <= idle_cores:
            break
    return time.perf_counter() - started


async def _enter(
    stack: Stack,
    topology: Topology,
    loadgen: LoadGenerator,
    events: EventsAt,
    warmup_s: float = WARMUP_S,
    warm_rate: float = 10.0,
) -> None:
    """Switch to ``topology`` and warm it up (first connections, lazily built FHIR classes)."""
    if stack.config.topology != topology:
        await asyncio.to_thread(stack.switch_topology, topology)
    await asyncio.sleep(3)  # consumers settle before the first load
    await loadgen.load(
        stack.config.ingest_url,
        stack.config.bootstrap,
        events(f"{topology}-warmup", warm_rate, warmup_s),
        warm_rate,
        20.0,
    )


def _say(pending: _Pending) -> None:
    e2e = pending.result.end_to_end
    print(
        f"{pending.topology} r{pending.repetition} {pending.label} @ {pending.offered:g}/s: "
        f"achieved {e2e.per_second:.1f}/s, p50 {e2e.p50_ms:.0f} ms, p99 {e2e.p99_ms:.0f} ms, "
        f"missing {pending.result.missing}"
        + (
            f", given up after {pending.result.abandoned_after_s:.1f} s"
            if pending.result.abandoned_after_s is not None
            else ""
        ),
        flush=True,
    )


EventsAt = Callable[[str, float, float], list[bytes]]


@dataclass
class _Run:
    """What the series gathers per topology while it runs."""

    bisections: dict[str, Bisection]
    probes: dict[str, list[Level]] = field(default_factory=dict)
    fixed: dict[str, list[tuple[Level, Level]]] = field(default_factory=dict)
    pooled: dict[str, list[float]] = field(default_factory=dict)
    profiled: dict[str, Level] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)


async def _capacity_block(
    stack: Stack, loadgen: LoadGenerator, events: EventsAt, plan: Plan, run: _Run
) -> None:
    """One ABBA block of bisection probes (each topology's probes continue its bisection)."""
    for _, topology in abba(SERVICES, MONOLITH, 1):
        await _enter(stack, topology, loadgen, events)
        # Idle: heartbeats, polls, the console; a drained pipeline is back near this.
        idle = await pipeline_cores(stack)
        bisection = run.bisections[topology]
        for _ in range(plan.probes_per_phase):
            rate = bisection.next_rate()
            pending = await _level(
                stack,
                loadgen,
                "capacity probe",
                rate,
                events(f"{topology}-probe", rate, plan.probe_s),
                0,
                settle_s=PROBE_SETTLE_S,
                give_up_past_ms=P99_BOUND_MS,
            )
            _say(pending)
            level = _finish(pending, [])
            bisection.record(rate, level.sustained)
            run.probes.setdefault(topology, []).append(level)
            waited = await drain(stack, idle + DRAIN_MARGIN_CORES)
            print(f"drained in {waited:.0f} s", flush=True)


async def _fixed_phase(
    stack: Stack,
    loadgen: LoadGenerator,
    events: EventsAt,
    topology: Topology,
    rep: int,
    seconds: float,
    run: _Run,
    profile_to: Path | None,
) -> None:
    """A quarter and a half of the topology's capacity (and a profiled half when asked)."""
    half = max(run.bisections[topology].sustained / 2, 1.0)
    await _enter(stack, topology, loadgen, events)
    offset = _file_size(stack.config.trace_file)
    pendings = []
    for label, rate in (("quarter capacity", half / 2), ("half capacity", half)):
        tag = label.split()[0]
        pending = await _level(
            stack, loadgen, label, rate, events(f"{topology}-{tag}-{rep}", rate, seconds), rep
        )
        _say(pending)
        pendings.append(pending)
    run.pooled.setdefault(topology, []).extend(pendings[1].result.latencies_ms)
    extra: _Pending | None = None
    if profile_to is not None and topology not in run.profiled:
        extra = await _level(
            stack,
            loadgen,
            "half capacity, profiled",
            half,
            events(f"{topology}-profiled", half, min(seconds, 20.0)),
            rep,
            profile_to=profile_to,
        )
        _say(extra)
        run.profiled[topology] = _finish(extra, [])
    await asyncio.sleep(SPAN_FLUSH_S)
    spans = spans_since(stack.config.trace_file, offset)
    low, high = (_finish(p, spans) for p in pendings)
    run.fixed.setdefault(topology, []).append((low, high))


async def run_topology(
    stack: Stack,
    given: EventsAt,
    plan: Plan,
    profile_to: Path | None = None,
) -> dict[str, Any]:
    """The in-process floor, capacity by bisection (one ABBA block), then fixed loads at a
    quarter and a half of each topology's capacity (``plan.repetitions`` ABBA blocks; each
    topology's first fixed phase profiles one extra level when ``profile_to`` is given), and
    issue 17's targets. The stack ends in the services topology."""
    started = time.monotonic()
    loadgen = LoadGenerator()
    run = _Run({name: Bisection(plan.start_rate) for name in TOPOLOGIES})
    numbers = itertools.count()

    def fresh(label: str, rate: float, seconds: float) -> list[bytes]:
        # Every level its own patients: ingest answers a Bundle it has merged already without
        # a new request, so a repeated level would measure nothing.
        return given(f"{label}-{next(numbers)}", rate, seconds)

    try:
        floor = await loadgen.floor(fresh("floor", 1.0, 400.0))
        print(f"floor: {floor['cpu_ms_per_event']:.2f} ms CPU per event", flush=True)
        await _enter(stack, SERVICES, loadgen, fresh, plan.first_warmup_s, plan.start_rate / 2)
        await _capacity_block(stack, loadgen, fresh, plan, run)
        per_phase = math.ceil(plan.latency_events / (2 * plan.repetitions))
        for rep, topology in abba(SERVICES, MONOLITH, plan.repetitions):
            if plan.budget_s is not None and time.monotonic() - started > plan.budget_s:
                run.skipped.append(f"{topology} repetition {rep + 1}")
                continue
            half = max(run.bisections[topology].sustained / 2, 1.0)
            await _fixed_phase(
                stack,
                loadgen,
                fresh,
                topology,
                rep,
                min(per_phase / half, plan.max_level_s),
                run,
                profile_to,
            )
    finally:
        loadgen.close()
        if stack.config.topology != "services":
            await asyncio.to_thread(stack.switch_topology, "services")
    results: dict[str, dict[str, Any]] = {
        name: _summary(
            run.probes.get(name, []),
            run.bisections[name],
            run.fixed.get(name, []),
            run.pooled.get(name, []),
        )
        for name in TOPOLOGIES
    }
    for name, level in run.profiled.items():
        results[name]["profiled_level"] = level.as_dict()
    return {
        "plan": asdict(plan),
        "achieved_share": ACHIEVED_SHARE,
        "p99_bound_ms": P99_BOUND_MS,
        "floor": floor,
        "topologies": results,
        "skipped": run.skipped,
        "targets": [t.as_dict() for t in targets(results, floor)],
    }


def _summary(
    probes: list[Level],
    bisection: Bisection,
    fixed: list[tuple[Level, Level]],
    pooled: list[float],
) -> dict[str, Any]:
    """One topology's figures: capacity, pooled latency at half capacity, CPU per event."""
    halves = [high for _, high in fixed]
    processes = medmesh_processes([lv for pair in fixed for lv in pair])
    half_rate = halves[0].offered_per_s if halves else math.nan
    seconds = sum(h.end_to_end.seconds for h in halves)
    in_pipeline = [lv.in_pipeline for lv in halves]
    hops: dict[str, list[HopFigures]] = {}
    for level in halves:
        for hop in level.hops:
            hops.setdefault(hop.hop, []).append(hop)
    return {
        "capacity_per_s": bisection.sustained,
        "bisection": bisection.as_dict(),
        "probes": [lv.as_dict() for lv in probes],
        "fixed": [{"low": low.as_dict(), "half": high.as_dict()} for low, high in fixed],
        "levels": [lv.as_dict() for lv in [*probes, *(lv for pair in fixed for lv in pair)]],
        "half_capacity": {
            "offered_per_s": half_rate,
            "end_to_end": summarize(
                f"end-to-end @ {half_rate:g}/s, pooled", pooled, seconds
            ).as_dict(),
            "p50_ms": spread(h.end_to_end.p50_ms for h in halves),
            "p99_ms": spread(h.end_to_end.p99_ms for h in halves),
            "in_pipeline_p50_ms": spread(s.p50_ms for s in in_pipeline),
            "hops": [
                {
                    "hop": hop,
                    "count": sum(f.count for f in found),
                    "wait_p50_ms": spread(f.wait_p50_ms for f in found),
                    "wait_p99_ms": spread(f.wait_p99_ms for f in found),
                    "work_p50_ms": spread(f.work_p50_ms for f in found),
                }
                for hop, found in hops.items()
            ],
            "usage": [asdict(u) for u in halves[-1].usage] if halves else [],
        },
        "cpu_ms_per_event": {
            "marginal_medmesh": spread(
                marginal_ms_per_event(low, high, processes) for low, high in fixed
            ),
            "marginal_all": spread(
                marginal_ms_per_event(low, high, [*processes, "kafka", "triton"])
                for low, high in fixed
            ),
            "marginal_by_process": {
                process: spread(marginal_ms_per_event(low, high, [process]) for low, high in fixed)
                for process in [*processes, "kafka", "triton"]
            },
            "average_medmesh_at_half": spread(
                per_event_ms(h.cores(processes), h.reports_per_s) for h in halves
            ),
            "load_generator_at_half": spread(
                per_event_ms(h.cores([CLIENT]), h.reports_per_s) for h in halves
            ),
        },
    }


@dataclass(frozen=True)
class Target:
    """One of issue 17's targets: a measured figure against its bound."""

    name: str
    value: float
    bound: float
    at_most: bool

    @property
    def met(self) -> bool:
        """Whether the figure is within its bound."""
        if math.isnan(self.value):
            return False
        return self.value <= self.bound if self.at_most else self.value >= self.bound

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {**asdict(self), "met": self.met}


def targets(results: Mapping[str, Any], floor: Mapping[str, Any]) -> list[Target]:
    """Issue 17's topology targets from one run's figures."""
    floor_ms = float(floor["cpu_ms_per_event"])
    services, monolith = results["services"], results["monolith"]

    def cpu(data: Mapping[str, Any]) -> float:
        return float(data["cpu_ms_per_event"]["marginal_medmesh"]["median"])

    found = [
        Target(
            "services CPU/event (marginal, medmesh processes) / floor",
            cpu(services) / floor_ms,
            3.5,
            True,
        ),
        Target("monolith CPU/event (marginal) / floor", cpu(monolith) / floor_ms, 2.0, True),
        Target(
            "services capacity / monolith capacity",
            services["capacity_per_s"] / monolith["capacity_per_s"]
            if monolith["capacity_per_s"]
            else math.nan,
            0.8,
            False,
        ),
    ]
    for name, data in results.items():
        e2e = data["half_capacity"]["end_to_end"]
        found.append(Target(f"{name} p50 at half capacity, ms (pooled)", e2e["p50_ms"], 30.0, True))
        found.append(
            Target(f"{name} p99 at half capacity, ms (pooled)", e2e["p99_ms"], 100.0, True)
        )
    return found


# --- Markdown ---------------------------------------------------------------------------------


def _range(figure: Mapping[str, float], digits: int = 1) -> str:
    if not figure.get("n"):
        return "-"
    return f"{figure['median']:.{digits}f} ({figure['min']:.{digits}f}-{figure['max']:.{digits}f})"


def _capacity_table(report: dict[str, Any]) -> str:
    lines = [
        "| topology | probes (offered /s: achieved /s, p99 ms, sustained) | capacity /s "
        "| lowest failed /s |",
        "|---|---|---|---|",
    ]
    for name, data in report["topologies"].items():
        probes = ", ".join(_probe_cell(p) for p in data["probes"])
        failed = data["bisection"]["failed_per_s"]
        lines.append(
            f"| {name} | {probes} | {data['capacity_per_s']:g} "
            f"| {'-' if failed is None else f'{failed:g}'} |"
        )
    return "\n".join(lines) + "\n"


def _probe_cell(probe: Mapping[str, Any]) -> str:
    e2e = probe["end_to_end"]
    given_up = probe.get("abandoned_after_s")
    verdict = (
        f"no (given up after {given_up:.0f} s)"
        if given_up is not None
        else ("yes" if probe["sustained"] else "no")
    )
    return f"{probe['offered_per_s']:g}: {e2e['per_second']:.1f}, {e2e['p99_ms']:.0f}, {verdict}"


def _fixed_table(report: dict[str, Any]) -> str:
    lines = [
        "| topology | at half capacity /s | n pooled | p50 ms pooled | p99 ms pooled "
        "| p50 ms per phase, median (range) | p99 ms per phase | in pipeline p50 ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, data in report["topologies"].items():
        half = data["half_capacity"]
        e2e = half["end_to_end"]
        lines.append(
            f"| {name} | {half['offered_per_s']:g} | {e2e['count']} | {e2e['p50_ms']:.1f} "
            f"| {e2e['p99_ms']:.1f} | {_range(half['p50_ms'])} | {_range(half['p99_ms'])} "
            f"| {_range(half['in_pipeline_p50_ms'])} |"
        )
    return "\n".join(lines) + "\n"


def _cpu_table(report: dict[str, Any]) -> str:
    lines = [
        "| topology | process | marginal CPU ms/event, median (range) |",
        "|---|---|---|",
    ]
    for name, data in report["topologies"].items():
        cpu = data["cpu_ms_per_event"]
        lines.append(
            f"| {name} | **all medmesh processes** | **{_range(cpu['marginal_medmesh'], 2)}** |"
        )
        lines.append(f"| {name} | with Kafka and Triton | {_range(cpu['marginal_all'], 2)} |")
        for process, figure in cpu["marginal_by_process"].items():
            lines.append(f"| {name} | {process} | {_range(figure, 2)} |")
        lines.append(
            f"| {name} | average at half capacity, medmesh processes (idle cost included) "
            f"| {_range(cpu['average_medmesh_at_half'], 2)} |"
        )
        lines.append(
            f"| {name} | load generator (own process, not counted above) "
            f"| {_range(cpu['load_generator_at_half'], 2)} |"
        )
    return "\n".join(lines) + "\n"


def _hops_table(report: dict[str, Any]) -> str:
    lines = [
        "| topology | hop: one topic traversal (publish start -> next stage's process start) "
        "| n | wait p50 ms | wait p99 ms | work p50 ms |",
        "|---|---|---|---|---|---|",
    ]
    for name, data in report["topologies"].items():
        for hop in data["half_capacity"]["hops"]:
            lines.append(
                f"| {name} | {hop['hop']} | {hop['count']} | {_range(hop['wait_p50_ms'], 2)} "
                f"| {_range(hop['wait_p99_ms'], 2)} | {_range(hop['work_p50_ms'], 2)} |"
            )
    return "\n".join(lines) + "\n"


def _targets_table(report: dict[str, Any]) -> str:
    lines = ["| target | measured | bound | met |", "|---|---|---|---|"]
    for t in report["targets"]:
        sign = "<=" if t["at_most"] else ">="
        lines.append(
            f"| {t['name']} | {t['value']:.2f} | {sign} {t['bound']:g} | {'yes' if t['met'] else 'no'} |"
        )
    return "\n".join(lines) + "\n"


def topology_markdown(report: dict[str, Any]) -> str:
    """The topology section: capacity, latency and CPU per event, per-hop waits, targets."""
    plan = report["plan"]
    floor = report["floor"]
    skipped = (
        f"\nSkipped for the time budget: {', '.join(report['skipped'])}.\n"
        if report["skipped"]
        else ""
    )
    return (
        f"Plan: capacity by bisection (one ABBA block, {plan['probes_per_phase']} probes per "
        f"phase, each held {plan['probe_s']:g} s; sustained = every report arrived, achieved >= "
        f"{report['achieved_share']:.0%} of offered, p99 <= {report['p99_bound_ms']:g} ms), then "
        f"{plan['repetitions']} ABBA repetitions of a quarter and a half of each topology's "
        f"capacity ({plan['latency_events']} latencies pooled at half capacity). The load "
        "generator runs in its own process; its CPU is not the pipeline's.\n\n"
        f"In-process floor (same libraries, same work, one process, no Kafka/HTTP/Triton/spans): "
        f"**{floor['cpu_ms_per_event']:.2f} ms CPU per event** over {floor['events']} events.\n"
        + skipped
        + "\n### Capacity\n\n"
        + _capacity_table(report)
        + "\n### End to end at half capacity\n\n"
        + _fixed_table(report)
        + "\n### CPU per event (marginal: Δcores / Δreports/s between a quarter and a half of "
        "capacity, per ABBA phase)\n\n"
        + _cpu_table(report)
        + "\n### Per hop at half capacity\n\n"
        + _hops_table(report)
        + "\n### Issue 17's targets\n\n"
        + _targets_table(report)
    )


def half_capacity_p99(report: dict[str, Any], topology: str) -> float:
    """End-to-end p99 at half capacity (NaN when absent)."""
    data = report["topologies"].get(topology)
    return float(data["half_capacity"]["end_to_end"]["p99_ms"]) if data else math.nan


def machine_details(proc: Path = PROC) -> dict[str, Any]:
    """CPU model and memory of this machine (Linux /proc; empty elsewhere)."""
    details: dict[str, Any] = {}
    try:
        cpuinfo = (proc / "cpuinfo").read_text()
        meminfo = (proc / "meminfo").read_text()
    except OSError:
        return details
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
    memory = re.search(r"^MemTotal:\s+(\d+) kB", meminfo, re.MULTILINE)
    if model:
        details["cpu_model"] = model.group(1).strip()
    if memory:
        details["memory_gib"] = round(int(memory.group(1)) / 1024**2, 1)
    loadavg = (proc / "loadavg").read_text().split() if (proc / "loadavg").exists() else []
    if len(loadavg) >= 3:
        # At the end of the run: the box may be shared, and everything competes for its cores.
        details["load_average_1_5_15_min"] = [float(v) for v in loadavg[:3]]
    return details
