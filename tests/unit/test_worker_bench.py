"""The worker benchmark's pure parts and harness (issue 17): hops found without a publish span,
and the in-memory Kafka the linger series runs the real TaskWorker on. No timing is asserted."""

from __future__ import annotations

from medmesh_cli.bench.topology import trace_hops
from medmesh_cli.bench.worker import _serve_arrivals, linger_markdown
from medmesh_cli.ops.waterfall import Span


def _span(span_id: str, name: str, service: str, start: int, end: int, parent: str | None) -> Span:
    return Span("t1", span_id, parent, name, "INTERNAL", service, start * 10**6, end * 10**6, {})


def test_a_hop_whose_record_carries_the_upstream_process_span_is_found() -> None:
    """The worker's results carry its task span's context (no publish span): the results hop
    runs from that span's end to reporting's process span; hops with a publish are unchanged."""
    trace = [
        _span("a", "medmesh.model.m.v1.tasks publish", "router", 10, 11, None),
        _span("b", "medmesh.model.m.v1.tasks process", "inference-m-v1", 30, 40, "a"),
        _span("c", "medmesh.inference.results process", "reporting", 52, 60, "b"),
        _span("d", "reporting.build-report", "reporting", 53, 58, "c"),
    ]
    found = {hop.topic: hop for hop in trace_hops(trace)}
    assert set(found) == {"medmesh.model.m.v1.tasks", "medmesh.inference.results"}
    assert found["medmesh.model.m.v1.tasks"].wait_ms == 20.0
    results = found["medmesh.inference.results"]
    assert (results.producer, results.consumer) == ("inference-m-v1", "reporting")
    assert results.wait_ms == 12.0
    assert results.work_ms == 8.0


async def test_the_linger_harness_commits_every_task_through_the_real_loop() -> None:
    """Tasks fed to the in-memory Kafka are all scored and committed by the TaskWorker, with
    either linger; a burst is served in full batches."""
    for adaptive in (False, True):
        latencies, batches = await _serve_arrivals(
            [0.0] * 130, adaptive=adaptive, serve_s=0.0, commit_s=0.0
        )
        assert len(latencies) == 130
        assert batches == 3


def test_linger_markdown_puts_fixed_beside_adaptive() -> None:
    """One row per load and policy, and the p50 ratio per load."""
    summary = {"count": 2, "p50_ms": 30.0, "p90_ms": 31.0, "p99_ms": 32.0}
    report = {
        "serve_ms": 3.0,
        "commit_ms": 5.0,
        "linger_ms": 20.0,
        "rows": [
            {"load": "low", "adaptive": False, "summary": summary, "batches": 2, "missing": 0},
            {
                "load": "low",
                "adaptive": True,
                "summary": {**summary, "p50_ms": 10.0},
                "batches": 2,
                "missing": 0,
            },
        ],
    }
    text = linger_markdown(report)
    assert "| low | fixed | 2 | 2 | 30.00 |" in text
    assert "- low: p50 fixed / adaptive **3.00x**" in text
