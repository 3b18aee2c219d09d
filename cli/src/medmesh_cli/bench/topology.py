"""Issue 9: services vs monolith, the same offered loads against each topology in turn.

On the bench stack's broker and Triton, the services topology (one process per service) takes
a ramp of open-loop HTTP loads (``pipeline.run_load``: sends scheduled by the clock, latency from
the planned send time to the report on medmesh.reports.diagnostic); then the service processes
stop and the monolith (``medmesh_monolith``: the same stage code in one process, Kafka only
at the edges) starts on the same port and takes the same ramp. Each phase starts with a short
unrecorded warm-up at the lowest rate. For every level:

- end-to-end latency percentiles and the achieved report rate;
- per hop, from the level's traces: the wait between a stage's publish and the next stage's
  process span (a Kafka hop in the services, an in-process queue in the monolith) and the work;
  plus "in pipeline": ingest's HTTP span start to the report's publish span start;
- CPU (average cores used during the level) and peak RSS (VmHWM, the process's lifetime peak)
  of every process, Triton's python-backend children and Kafka included (/proc, Linux).

A topology's capacity is the highest offered load it sustains: every report arrives, the
achieved rate is >= 95 % of the offered one and p99 stays under ``P99_BOUND_MS``. Each topology
then gets one more level at half its capacity, where the issue's e2e target (p99 <= 100 ms) is
judged. The stack is left in the services topology.
"""

from __future__ import annotations

import asyncio
import math
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from medmesh_cli.bench.common import Ratio, cpu_seconds_from_stat, ratio, ratios_markdown
from medmesh_cli.bench.pipeline import run_load
from medmesh_cli.bench.stats import Summary, percentile, summarize
from medmesh_cli.devstack.stack import Stack, Topology
from medmesh_cli.ops.waterfall import CONVERSATION_ID, Hop, Span, hops, parse_spans
from medmesh_contracts import topics

TOPOLOGIES: tuple[Topology, ...] = ("services", "monolith")
ACHIEVED_SHARE = 0.95
P99_BOUND_MS = 1000.0
# The BatchSpanProcessor exports every 5 s: wait that long before reading a phase's spans.
SPAN_FLUSH_S = 6.0
WARMUP_S = 4.0
CLIENT = "bench client (load generator)"
PROC = Path("/proc")
EventsFor = Callable[[str], list[bytes]]


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

    def __init__(self, pids: dict[str, int]) -> None:
        self._trees = {name: process_tree(pid) for name, pid in pids.items()}
        # The load generator itself (not its tree: the stack's processes are its children).
        self._trees[CLIENT] = [os.getpid()]
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

    @property
    def sustained(self) -> bool:
        """Everything reported, at >= 95 % of the offered rate, with p99 under the bound."""
        e2e = self.end_to_end
        return (
            self.missing == 0
            and self.non_2xx == 0
            and e2e.per_second >= ACHIEVED_SHARE * self.offered_per_s
            and e2e.p99_ms <= P99_BOUND_MS
        )

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {**asdict(self), "sustained": self.sustained}


def capacity(levels: Iterable[Level]) -> float:
    """The highest offered load sustained (0 when none was)."""
    return max((lv.offered_per_s for lv in levels if lv.sustained), default=0.0)


@dataclass
class _Pending:
    topology: str
    label: str
    offered: float
    result: Any
    meter_usage: list[Usage]


async def _level(
    stack: Stack, topology: str, label: str, rate: float, events: list[bytes]
) -> _Pending:
    meter = UsageMeter(stack_pids(stack))
    result = await run_load(stack.config.ingest_url, stack.config.bootstrap, events, rate)
    usage = meter.usage()
    return _Pending(topology, label, rate, result, usage)


def _finish(pending: _Pending, spans: Sequence[Span]) -> Level:
    result = pending.result
    figures, in_pipeline = hop_figures(spans, result.correlation_ids)
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
    )


async def _phase(
    stack: Stack,
    topology: Topology,
    rates: Sequence[float],
    events_for: Callable[[str, float], list[bytes]],
) -> dict[str, Any]:
    if stack.config.topology != topology:
        await asyncio.to_thread(stack.switch_topology, topology)
    await asyncio.sleep(3)  # consumers settle before the first load
    # Warm-up, not recorded: first connections, lazily built FHIR model classes, JIT-less caches.
    warm_rate = min(rates)
    await run_load(
        stack.config.ingest_url,
        stack.config.bootstrap,
        events_for(f"{topology}-warmup", warm_rate)[: max(1, int(warm_rate * WARMUP_S))],
        warm_rate,
    )
    offset = _file_size(stack.config.trace_file)
    pending = []
    for rate in rates:
        level = await _level(stack, topology, f"{rate:g}/s", rate, events_for(topology, rate))
        pending.append(level)
        print(
            f"{topology} @ {rate:g}/s: achieved {level.result.end_to_end.per_second:.1f}/s, "
            f"p99 {level.result.end_to_end.p99_ms:.0f} ms, missing {level.result.missing}"
        )
    await asyncio.sleep(SPAN_FLUSH_S)
    spans = spans_since(stack.config.trace_file, offset)
    levels = [_finish(p, spans) for p in pending]
    cap = capacity(levels)
    half_rate = cap / 2 if cap else min(rates) / 2
    offset = _file_size(stack.config.trace_file)
    half_pending = await _level(
        stack, topology, "half capacity", half_rate, events_for(f"{topology}-half", half_rate)
    )
    await asyncio.sleep(SPAN_FLUSH_S)
    half = _finish(half_pending, spans_since(stack.config.trace_file, offset))
    return {
        "levels": [lv.as_dict() for lv in levels],
        "capacity_per_s": cap,
        "half_capacity": half.as_dict(),
    }


async def run_topology(
    stack: Stack, rates: Sequence[float], events_for: Callable[[str, float], list[bytes]]
) -> dict[str, Any]:
    """Both topologies over the same ramp; the stack ends in the services topology."""
    results: dict[str, Any] = {}
    try:
        for topology in TOPOLOGIES:
            results[topology] = await _phase(stack, topology, rates, events_for)
    finally:
        if stack.config.topology != "services":
            await asyncio.to_thread(stack.switch_topology, "services")
    services, monolith = results["services"], results["monolith"]
    ratios: list[Ratio] = [
        ratio(
            "services / monolith capacity",
            services["capacity_per_s"],
            monolith["capacity_per_s"],
            0.5,
        )
    ]
    return {
        "rates": list(rates),
        "achieved_share": ACHIEVED_SHARE,
        "p99_bound_ms": P99_BOUND_MS,
        "topologies": results,
        "ratios": [r.as_dict() for r in ratios],
    }


# --- Markdown ---------------------------------------------------------------------------------


def _levels_table(report: dict[str, Any]) -> str:
    lines = [
        "| topology | offered /s | achieved /s | p50 ms | p90 ms | p99 ms | in pipeline p50 ms "
        "| missing | CPU cores (pipeline, Kafka, Triton) | sustained |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, data in report["topologies"].items():
        for level in [*data["levels"], data["half_capacity"]]:
            e2e = level["end_to_end"]
            cores = sum(u["cpu_cores"] for u in level["usage"] if u["name"] != CLIENT)
            label = level["label"] if level["label"] == "half capacity" else ""
            lines.append(
                f"| {name} {label} | {level['offered_per_s']:g} | {e2e['per_second']:.1f} "
                f"| {e2e['p50_ms']:.1f} | {e2e['p90_ms']:.1f} | {e2e['p99_ms']:.1f} "
                f"| {level['in_pipeline']['p50_ms']:.1f} | {level['missing']} | {cores:.2f} "
                f"| {'yes' if level['sustained'] else 'no'} |"
            )
    return "\n".join(lines) + "\n"


def _hops_table(report: dict[str, Any]) -> str:
    lines = [
        "| topology | hop (wait = publish start -> next stage's process start) | n "
        "| wait p50 ms | wait p99 ms | work p50 ms |",
        "|---|---|---|---|---|---|",
    ]
    for name, data in report["topologies"].items():
        level = data["levels"][0]
        for hop in level["hops"]:
            lines.append(
                f"| {name} @ {level['offered_per_s']:g}/s | {hop['hop']} | {hop['count']} "
                f"| {hop['wait_p50_ms']:.2f} | {hop['wait_p99_ms']:.2f} | {hop['work_p50_ms']:.2f} |"
            )
    return "\n".join(lines) + "\n"


def _usage_table(report: dict[str, Any]) -> str:
    lines = [
        "| topology, level | process | CPU cores | peak RSS MiB |",
        "|---|---|---|---|",
    ]
    for name, data in report["topologies"].items():
        level = data["half_capacity"]
        for usage in sorted(level["usage"], key=lambda u: u["name"]):
            lines.append(
                f"| {name} @ {level['offered_per_s']:g}/s (half capacity) | {usage['name']} "
                f"| {usage['cpu_cores']:.2f} | {usage['peak_rss_mb']:.0f} |"
            )
    return "\n".join(lines) + "\n"


def topology_markdown(report: dict[str, Any]) -> str:
    """The topology section: levels, capacities, per-hop waits, per-process usage, ratio."""
    capacities = ", ".join(
        f"{name} {data['capacity_per_s']:g}/s" for name, data in report["topologies"].items()
    )
    return (
        f"Sustained = every report arrived, achieved >= {report['achieved_share']:.0%} of "
        f"offered, p99 <= {report['p99_bound_ms']:g} ms. Capacity: {capacities}.\n\n"
        + _levels_table(report)
        + "\n### Per hop, at the lowest load\n\n"
        + _hops_table(report)
        + "\n### Per process, at half capacity (peak RSS = lifetime peak)\n\n"
        + _usage_table(report)
        + "\n"
        + ratios_markdown(report["ratios"])
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
