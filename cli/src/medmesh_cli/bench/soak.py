"""The soak (issue 9 item 4): open-loop load at half the measured capacity for ``--duration``
seconds, sampling the resident memory of every process of the stack; the target is that none
grows by more than 5% from the first minute after warm-up to the last minute.

Run with `make soak` (DURATION=..., RATE=...) or `python -m medmesh_cli.bench.soak`; writes
docs/benchmarks/soak.json and soak.md. Capacity is measured first unless ``--rate`` is given:
a burst of distinct events posted by a few concurrent senders, divided by the time until the
last report. Memory is read from /proc (VmRSS), each part with its child processes (Triton's
python backend stubs).
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import statistics
import subprocess
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from aiokafka import AIOKafkaConsumer

from medmesh_cli.bench.pipeline import load_template, vitals_events
from medmesh_cli.bench.topology import descendants, parent_pids, stack_pids
from medmesh_cli.devstack.paths import repo_root, run_dir
from medmesh_cli.devstack.stack import Stack, StackConfig, StackPorts
from medmesh_contracts import topics

GROWTH_LIMIT_PCT = 5.0
SOAK_PORTS = StackPorts.from_base(27000)
FHIR_JSON = {"content-type": "application/fhir+json"}


# --- memory (pure parts first) -----------------------------------------------------------------


def parse_vm_rss_kib(status_text: str) -> int:
    """VmRSS in KiB from the text of /proc/<pid>/status (0 when absent: a zombie)."""
    for line in status_text.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def tree_rss_kib(root: int, parents: Mapping[int, int]) -> int:
    """Resident memory of a process and its descendants, KiB."""
    total = 0
    for pid in descendants(root, parents):
        try:
            total += parse_vm_rss_kib(Path(f"/proc/{pid}/status").read_text())
        except OSError:
            continue
    return total


@dataclass(frozen=True)
class Growth:
    """One process's memory over the soak."""

    process: str
    first_minute_mib: float
    last_minute_mib: float
    max_mib: float
    growth_pct: float

    @property
    def within_limit(self) -> bool:
        """At most GROWTH_LIMIT_PCT percent more in the last minute than in the first."""
        return self.growth_pct <= GROWTH_LIMIT_PCT


def growth(
    samples: Sequence[tuple[float, Mapping[str, int]]], warmup_s: float, window_s: float
) -> list[Growth]:
    """Mean RSS of each process in the first window after warm-up vs in the last window.

    ``samples`` are (seconds since the load began, {process: KiB}); the windows are
    [warmup_s, warmup_s + window_s) and (end - window_s, end].
    """
    if not samples:
        return []
    end = samples[-1][0]
    names = sorted({name for _, sample in samples for name in sample})
    rows = []
    for name in names:
        first = [s[name] for t, s in samples if warmup_s <= t < warmup_s + window_s and name in s]
        last = [s[name] for t, s in samples if t > end - window_s and name in s]
        every = [s[name] for _, s in samples if name in s]
        if not first or not last:
            continue
        before, after = statistics.fmean(first), statistics.fmean(last)
        rows.append(
            Growth(
                process=name,
                first_minute_mib=round(before / 1024, 1),
                last_minute_mib=round(after / 1024, 1),
                max_mib=round(max(every) / 1024, 1),
                growth_pct=round((after - before) / before * 100, 2) if before else 0.0,
            )
        )
    return rows


def machine_info() -> dict[str, Any]:
    """CPUs (nproc), CPU model (lscpu), memory and Python of this machine."""
    model = ""
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    for line in lscpu.splitlines():
        if line.startswith("Model name:"):
            model = line.split(":", 1)[1].strip()
    memory_kib = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            memory_kib = int(line.split()[1])
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "memory_gib": round(memory_kib / 2**20, 1),
        "python": platform.python_version(),
    }


# --- load ----------------------------------------------------------------------------------------


class ReportCounter:
    """Counts reports on the reports topic (read_committed, from the end) in the background."""

    def __init__(self, bootstrap: str) -> None:
        self.count = 0
        self.last_at = 0.0
        self._consumer = AIOKafkaConsumer(
            topics.REPORTS_DIAGNOSTIC,
            bootstrap_servers=bootstrap,
            auto_offset_reset="latest",
            isolation_level="read_committed",
            group_id=f"soak-{uuid.uuid4().hex[:8]}",
        )
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Join, wait until the partitions are assigned, and count from then on."""
        await self._consumer.start()
        for _ in range(150):  # the group's first assignment, 30 s at most
            if self._consumer.assignment():
                break
            await asyncio.sleep(0.2)
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        async for _ in self._consumer:
            self.count += 1
            self.last_at = time.monotonic()

    async def wait_for(self, count: int, timeout_s: float) -> None:
        """Until ``count`` reports were seen or ``timeout_s`` passed."""
        deadline = time.monotonic() + timeout_s
        while self.count < count and time.monotonic() < deadline:  # noqa: ASYNC110 -- polls a counter another task fills
            await asyncio.sleep(0.1)

    async def stop(self) -> None:
        """Stop counting."""
        if self._task is not None:
            self._task.cancel()
        await self._consumer.stop()


def shift_times(node: Any, shift: timedelta) -> Any:
    """The Bundle with every effectiveDateTime moved by ``shift`` (their order kept)."""
    if isinstance(node, dict):
        return {
            k: (datetime.fromisoformat(v) + shift).isoformat()
            if k == "effectiveDateTime" and isinstance(v, str)
            else shift_times(v, shift)
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [shift_times(v, shift) for v in node]
    return node


def event_maker(prefix: str, patients: int) -> Callable[[int], bytes]:
    """Event number i: the high-risk vitals Bundle of patient i mod ``patients``, with varied
    values and readings taken now, so each event is new for ingest (which dedupes repeats)."""
    template = load_template(
        repo_root() / "tests" / "fixtures" / "fhir" / "vitals-bundle-high.json"
    )
    latest = max(
        datetime.fromisoformat(e["resource"]["effectiveDateTime"])
        for e in template["entry"]
        if "effectiveDateTime" in e["resource"]
    )

    def make(i: int) -> bytes:
        varied = json.loads(
            vitals_events(template, 1, 1, seed=i, prefix=f"{prefix}-{i % patients}")[0]
        )
        return json.dumps(shift_times(varied, datetime.now(UTC) - latest)).encode()

    return make


async def measure_capacity(stack: Stack, events: int, senders: int) -> float:
    """Reports per second when ``events`` distinct events are posted by ``senders`` at once."""
    counter = ReportCounter(stack.config.bootstrap)
    await counter.start()
    make = event_maker(f"soak-cap-{uuid.uuid4().hex[:6]}", patients=events)
    queue = list(range(events))
    accepted = 0
    async with httpx.AsyncClient(base_url=stack.config.ingest_url, timeout=30) as client:

        async def sender() -> None:
            nonlocal accepted
            while queue:
                i = queue.pop()
                response = await client.post("/fhir", content=make(i), headers=FHIR_JSON)
                accepted += response.status_code // 100 == 2

        started = time.monotonic()
        await asyncio.gather(*(sender() for _ in range(senders)))
    await counter.wait_for(accepted, timeout_s=120)
    await counter.stop()
    elapsed = (counter.last_at or time.monotonic()) - started
    return counter.count / elapsed if elapsed > 0 else 0.0


@dataclass
class LoadTally:
    """What the soak's open-loop load did."""

    sent: int = 0
    accepted: int = 0
    non_2xx: int = 0
    no_answer: int = 0


async def soak_load(
    stack: Stack, rate: float, duration_s: float, sample_every_s: float, patients: int
) -> tuple[LoadTally, int, list[tuple[float, dict[str, int]]]]:
    """Open-loop load at ``rate`` for ``duration_s`` over ``patients`` patients while sampling
    RSS; (tally, reports, samples)."""
    counter = ReportCounter(stack.config.bootstrap)
    await counter.start()
    make = event_maker(f"soak-{uuid.uuid4().hex[:6]}", patients)
    tally = LoadTally()
    samples: list[tuple[float, dict[str, int]]] = []
    pending: set[asyncio.Task[None]] = set()
    limits = httpx.Limits(max_connections=100, max_keepalive_connections=20)
    async with httpx.AsyncClient(
        base_url=stack.config.ingest_url, timeout=30, limits=limits
    ) as client:

        async def send(payload: bytes) -> None:
            try:
                response = await client.post("/fhir", content=payload, headers=FHIR_JSON)
            except httpx.HTTPError:
                tally.no_answer += 1
                return
            if response.status_code // 100 == 2:
                tally.accepted += 1
            else:
                tally.non_2xx += 1

        async def sample() -> None:
            while True:
                parents = await asyncio.to_thread(parent_pids)
                rss = {name: tree_rss_kib(pid, parents) for name, pid in stack_pids(stack).items()}
                samples.append((time.monotonic() - started, rss))
                await asyncio.sleep(sample_every_s)

        started = time.monotonic()
        sampler = asyncio.create_task(sample())
        i = 0
        while (now := time.monotonic()) < started + duration_s:
            planned = started + i / rate
            if planned > now:
                await asyncio.sleep(planned - now)
            task = asyncio.create_task(send(make(i)))
            pending.add(task)
            task.add_done_callback(pending.discard)
            tally.sent += 1
            i += 1
        await asyncio.gather(*pending)
        sampler.cancel()
    await counter.wait_for(tally.accepted, timeout_s=60)
    await counter.stop()
    return tally, counter.count, samples


# --- command ------------------------------------------------------------------------------------


def soak(
    duration: Annotated[float, typer.Option(help="seconds of load")] = 600.0,
    rate: Annotated[
        float | None, typer.Option(help="events per second (default: half the measured capacity)")
    ] = None,
    capacity_events: Annotated[int, typer.Option(help="events of the capacity burst")] = 300,
    patients: Annotated[
        int, typer.Option(help="patient population of the soak (a ward or a hospital)")
    ] = 500,
    warmup: Annotated[
        float | None,
        typer.Option(help="seconds before the first memory window (default: 60, or duration/4)"),
    ] = None,
    sample_every: Annotated[float, typer.Option(help="seconds between memory samples")] = 5.0,
    out: Annotated[
        Path | None, typer.Option(help="output folder (default docs/benchmarks)")
    ] = None,
) -> None:
    """Soak a private stack at half its capacity and check every process's memory growth."""
    target = out or repo_root() / "docs" / "benchmarks"
    target.mkdir(parents=True, exist_ok=True)
    warmup = min(60.0, duration / 4) if warmup is None else warmup
    # Windows of a minute, shorter for short runs (two windows that do not overlap).
    window = min(60.0, max(sample_every * 2, (duration - warmup) / 2))
    if duration - warmup < 2 * sample_every * 2:
        raise typer.BadParameter("--duration must leave room for two memory windows after warm-up")
    stack = Stack(
        StackConfig(
            ports=SOAK_PORTS, state_dir=run_dir("soak"), partitions=3, with_fhir_server=False
        )
    )
    print("starting the soak stack ...")
    stack.start()
    try:
        capacity = None
        if rate is None:
            print(f"measuring capacity with a burst of {capacity_events} events ...")
            capacity = asyncio.run(measure_capacity(stack, capacity_events, senders=8))
            rate = max(0.5, capacity / 2)
        print(f"soaking at {rate:.1f} events/s for {duration:g} s ...")
        tally, reports, samples = asyncio.run(
            soak_load(stack, rate, duration, sample_every, patients)
        )
        exited = stack.exited()
    finally:
        stack.stop()
    rows = growth(samples, warmup, window)
    report = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": f"python -m medmesh_cli.bench.soak --duration {duration:g}"
        + (f" --rate {rate:g}" if capacity is None else ""),
        "machine": machine_info(),
        "duration_s": duration,
        "warmup_s": warmup,
        "window_s": window,
        "capacity_per_s": None if capacity is None else round(capacity, 1),
        "rate_per_s": round(rate, 2),
        "patients": patients,
        "load": asdict(tally),
        "reports": reports,
        "exited": exited,
        "growth": [asdict(r) | {"within_limit": r.within_limit} for r in rows],
        "samples": [{"t": round(t, 1), "rss_kib": s} for t, s in samples],
    }
    (target / "soak.json").write_text(json.dumps(report, indent=2) + "\n")
    markdown = soak_markdown(report)
    (target / "soak.md").write_text(markdown)
    print(markdown)
    print(f"written to {target}/soak.json and soak.md")
    if exited or not all(r.within_limit for r in rows):
        raise typer.Exit(1)


def soak_markdown(report: dict[str, Any]) -> str:
    """The soak's results page."""
    m = report["machine"]
    capacity = report["capacity_per_s"]
    load = report["load"]
    lines = [
        "# medmesh soak (issue 9 item 4)",
        "",
        f"Run {report['when']}, `{report['command']}`: **{report['duration_s']:g} s** of "
        f"open-loop HTTP load at {report['rate_per_s']:g} events/s"
        + (f" (half the measured capacity of {capacity:g} reports/s)" if capacity else "")
        + f" over {report['patients']} patients, on {m['nproc']} CPUs ({m['cpu_model']}), {m['memory_gib']} GiB memory; broker, "
        "Triton and services share those cores.",
        "",
        f"Load: {load['sent']} sent, {load['accepted']} accepted (2xx), {load['non_2xx']} other "
        f"answers, {load['no_answer']} without answer; {report['reports']} reports read "
        f"(read_committed). Processes that exited: {', '.join(report['exited']) or 'none'}.",
        "",
        f"Memory: mean RSS (process and its children) in the first {report['window_s']:g} s "
        f"after {report['warmup_s']:g} s of warm-up vs the last {report['window_s']:g} s; "
        f"target: at most {GROWTH_LIMIT_PCT:g}% growth.",
        "",
        "| process | first window MiB | last window MiB | max MiB | growth % | within 5% |",
        "|---|---|---|---|---|---|",
    ]
    for row in report["growth"]:
        lines.append(
            f"| {row['process']} | {row['first_minute_mib']} | {row['last_minute_mib']} "
            f"| {row['max_mib']} | {row['growth_pct']:+.2f} | {'yes' if row['within_limit'] else 'NO'} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    typer.run(soak)
