"""The topology bench's pure parts (issue 17): ABBA order, capacity bisection, marginal CPU per
event, medians and ranges, targets, the py-spy command and the in-process floor."""

from __future__ import annotations

import asyncio
import io
import logging
import math
from dataclasses import replace
from pathlib import Path

import pytest

from medmesh_cli.bench import floor as floor_module
from medmesh_cli.bench.flames import summary as flame_summary
from medmesh_cli.bench.floor import floor_cpu_per_event
from medmesh_cli.bench.pipeline import (
    _sent_or_given_up,
    _Tally,
    load_template,
    p99_beyond,
    vitals_events,
)
from medmesh_cli.bench.profile import record_argv
from medmesh_cli.bench.stats import percentile, summarize
from medmesh_cli.bench.topology import (
    CLIENT,
    Bisection,
    Level,
    Target,
    Usage,
    _probe_cell,
    abba,
    marginal_ms_per_event,
    medmesh_processes,
    spread,
    targets,
)

REPO = Path(__file__).resolve().parents[2]


def _level(reports: int, wall_s: float, cores: dict[str, float]) -> Level:
    return Level(
        topology="services",
        label="",
        offered_per_s=reports / wall_s,
        end_to_end=summarize("e2e", [10.0] * reports, wall_s),
        http=summarize("http", [], wall_s),
        in_pipeline=summarize("in", [], wall_s),
        missing=0,
        non_2xx=0,
        usage=[Usage(name, value, 100.0) for name, value in cores.items()],
        hops=[],
        wall_s=wall_s,
    )


def test_abba_alternates_which_topology_runs_first() -> None:
    """Each repetition runs A B B A, so A and B each lead half of the adjacent pairs."""
    assert abba("services", "monolith", 2) == [
        (0, "services"),
        (0, "monolith"),
        (0, "monolith"),
        (0, "services"),
        (1, "services"),
        (1, "monolith"),
        (1, "monolith"),
        (1, "services"),
    ]


def test_bisection_doubles_until_a_failure_then_halves_the_bracket() -> None:
    """From 20/s: 20 and 40 hold, 80 fails, so 60 is probed; 60 fails, so 50; capacity is the
    highest rate that held."""
    bisection = Bisection(20.0)
    verdicts = {20.0: True, 40.0: True, 80.0: False, 60.0: False, 50.0: True}
    probed = []
    for _ in range(5):
        rate = bisection.next_rate()
        probed.append(rate)
        bisection.record(rate, verdicts[rate])
    assert probed == [20.0, 40.0, 80.0, 60.0, 50.0]
    assert bisection.sustained == 50.0
    assert bisection.failed == 60.0


def test_bisection_below_the_start_rate_halves_towards_zero() -> None:
    """A failed first probe bisects between nothing sustained and the start rate."""
    bisection = Bisection(20.0)
    bisection.record(bisection.next_rate(), False)
    assert bisection.next_rate() == 10.0


def test_marginal_cpu_is_the_extra_cores_over_the_extra_reports() -> None:
    """0.3 cores at 10 reports/s and 0.5 at 20/s: 20 ms per extra event; the constant (idle)
    part and the load generator do not count."""
    low = _level(100, 10.0, {"ingest": 0.2, "router": 0.1, CLIENT: 0.5})
    high = _level(200, 10.0, {"ingest": 0.35, "router": 0.15, CLIENT: 0.9})
    assert medmesh_processes([low, high]) == ["ingest", "router"]
    assert math.isclose(marginal_ms_per_event(low, high, ["ingest", "router"]), 20.0)
    assert math.isclose(marginal_ms_per_event(low, high, ["ingest"]), 15.0)
    assert math.isnan(marginal_ms_per_event(high, high, ["ingest"]))


def test_spread_gives_median_and_range_without_nans() -> None:
    """Median and range of repeated figures, NaNs left out."""
    assert spread([3.0, 1.0, math.nan, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3}
    assert spread([])["n"] == 0


def test_targets_compare_ratios_and_latencies_with_their_bounds() -> None:
    """Services at 4x the floor miss the 3.5x target, the monolith at 1.5x meets 2x; 45/50
    capacity meets 80 %; a p99 of 120 ms misses 100 ms."""

    def topology(cpu: float, cap: float, p50: float, p99: float) -> dict[str, object]:
        return {
            "capacity_per_s": cap,
            "cpu_ms_per_event": {"marginal_medmesh": {"median": cpu}},
            "half_capacity": {"end_to_end": {"p50_ms": p50, "p99_ms": p99}},
        }

    found = {
        t.name: t.met
        for t in targets(
            {
                "services": topology(20.0, 45.0, 25.0, 120.0),
                "monolith": topology(7.5, 50.0, 20.0, 80.0),
            },
            {"cpu_ms_per_event": 5.0},
        )
    }
    assert found == {
        "services CPU/event (marginal, medmesh processes) / floor": False,
        "monolith CPU/event (marginal) / floor": True,
        "services capacity / monolith capacity": True,
        "services p50 at half capacity, ms (pooled)": True,
        "services p99 at half capacity, ms (pooled)": False,
        "monolith p50 at half capacity, ms (pooled)": True,
        "monolith p99 at half capacity, ms (pooled)": True,
    }
    assert not Target("x", math.nan, 1.0, True).met


def test_py_spy_records_one_pid_as_a_flame_graph_without_pausing_it(tmp_path: Path) -> None:
    """The recorder targets the pid for the level's duration, non-blocking, into the SVG."""
    svg = tmp_path / "flame-router.svg"
    assert record_argv("py-spy", 4242, 20, svg) == [
        "py-spy",
        "record",
        "--pid",
        "4242",
        "--format",
        "flamegraph",
        "--duration",
        "20",
        "--rate",
        "50",
        "--nonblocking",
        "-o",
        str(svg),
    ]


def test_floor_runs_every_stage_and_reports_each_event() -> None:
    """The in-process floor takes each Bundle through ingest, routing, NEWS2 and reporting:
    one report per event, and a positive CPU time per event."""
    template = load_template(REPO / "tests" / "fixtures" / "fhir" / "vitals-bundle-high.json")
    events = vitals_events(template, 12, 12, prefix="floor-test")
    floor = floor_cpu_per_event(events, warmup=2, service_logging=False)
    assert (floor["events"], floor["reports"]) == (10, 10)
    assert floor["cpu_ms_per_event"] > 0


def test_floor_leaves_the_load_generators_logging_as_it_found_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The floor logs as a service does, then restores the root logger, so that the loads sent
    from the same process do not log every HTTP request."""
    root = logging.getLogger()
    before = (list(root.handlers), root.level)

    def service_logging(service: str) -> None:
        root.addHandler(logging.StreamHandler(io.StringIO()))
        root.setLevel(logging.DEBUG)

    monkeypatch.setattr(floor_module, "configure_logging", service_logging)
    template = load_template(REPO / "tests" / "fixtures" / "fhir" / "vitals-bundle-high.json")
    floor_cpu_per_event(vitals_events(template, 3, 3, prefix="floor-log"), warmup=1)
    assert (list(root.handlers), root.level) == before


def _svg_frame(name: str, y: int, x: int, w: int) -> str:
    return (
        f"<g><title>{name} ({w} samples, {w}%)</title>"
        f'<rect x="{x}%" y="{y}" width="{w}%" height="15" fill="red" fg:x="{x}" fg:w="{w}"/></g>'
    )


def test_flame_summary_reads_self_time_and_families(tmp_path: Path) -> None:
    """A root of 10 samples calling a logging frame (6, which calls another logging frame of
    3) and a socket write (2): self time is what a frame's children leave, and a family counts
    each sample once even where its frames nest."""
    svg = tmp_path / "flame-router.svg"
    svg.write_text(
        "<svg>"
        + _svg_frame("run (medmesh/app.py:1)", 0, 0, 10)
        + _svg_frame("emit (logging/__init__.py:1113)", 16, 0, 6)
        + _svg_frame("format (logging/__init__.py:900)", 32, 0, 3)
        + _svg_frame("_SelectorSocketTransport.write (asyncio/selector_events.py:1)", 16, 6, 2)
        + "</svg>"
    )
    found = flame_summary(svg)
    assert found["samples"] == 10
    assert found["top_self"] == [
        {"frame": "emit (logging/__init__.py:1113)", "share": 0.3},
        {"frame": "format (logging/__init__.py:900)", "share": 0.3},
        {"frame": "run (medmesh/app.py:1)", "share": 0.2},
        {"frame": "_SelectorSocketTransport.write (asyncio/selector_events.py:1)", "share": 0.2},
    ]
    families = found["families"]
    assert isinstance(families, dict)
    assert families["logging (stdlib handlers, structlog)"] == 0.6
    assert families["socket writes (asyncio transport)"] == 0.2
    assert families["OpenTelemetry (spans, export, metrics)"] == 0.0


def test_p99_beyond_agrees_with_the_nearest_rank_percentile() -> None:
    """A load is given up only when its p99, whatever the other latencies, exceeds the bound."""
    for expected in (1, 50, 99, 100, 101, 2700):
        for late in range(expected + 1):
            worst_case_rest = sorted([10.0] * (expected - late) + [5000.0] * late)
            assert p99_beyond(late, expected) == (percentile(worst_case_rest, 99) > 1000.0)


def test_tally_counts_late_sends_and_reports_and_missing_unsent_events() -> None:
    """Unanswered sends and unreported events past the bound are late; unsent ones are missing."""
    tally = _Tally(events=10)
    tally.unanswered = {0: 0.0, 1: 9.5}
    tally.planned = {"a": 0.0, "b": 0.0, "c": 9.9}
    tally.arrived = {"b": 0.5}
    tally.finished = tally.accepted = 3
    assert tally.late(1000.0, now=10.0) == 2  # send 0 and report "a"; send 1 and "c" are recent
    assert tally.missing == 2 + 7  # "a" and "c" not arrived; seven events not sent or answered
    assert tally.hopeless(1000.0, now=10.0)  # of 10 latencies the p99 is the largest: late
    big = _Tally(events=1000, planned={str(i): 0.0 for i in range(11)}, accepted=11)
    assert big.hopeless(1000.0, now=10.0)  # 11 late of 1,000: the 99th percentile is late
    assert not _Tally(events=1000, planned={str(i): 0.0 for i in range(10)}, accepted=10).hopeless(
        1000.0, now=10.0
    )


async def test_a_hopeless_load_stops_sending_at_once() -> None:
    """Once the load is hopeless its pending sends are cancelled and the time is returned."""
    sent: list[int] = []

    async def send(index: int) -> None:
        await asyncio.sleep(index * 0.1)
        sent.append(index)

    sends = asyncio.gather(*(send(i) for i in range(100)))
    given_up = await _sent_or_given_up(sends, lambda: len(sent) >= 3)
    assert given_up is not None
    await asyncio.sleep(0.5)  # the cancelled sends stay cancelled
    assert 3 <= len(sent) < 10


async def test_a_load_that_is_never_hopeless_sends_everything() -> None:
    """Without giving up (or never hopeless), every send runs and no time is returned."""
    done: list[int] = []

    async def send(index: int) -> None:
        await asyncio.sleep(0.01)
        done.append(index)

    assert await _sent_or_given_up(asyncio.gather(*(send(i) for i in range(5))), None) is None
    assert (
        await _sent_or_given_up(asyncio.gather(*(send(i) for i in range(5))), lambda: False) is None
    )
    assert len(done) == 10


def test_a_given_up_probe_is_not_sustained_and_says_so() -> None:
    """A probe given up early fails its verdict, and the capacity table says when it stopped."""
    level = replace(_level(300, 10.0, {}), abandoned_after_s=4.2)
    assert not level.sustained
    assert replace(level, abandoned_after_s=None).sustained
    assert "given up after 4 s" in _probe_cell(level.as_dict())
