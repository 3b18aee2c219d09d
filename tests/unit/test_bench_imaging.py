"""Pure logic of the imaging benchmark series: the time split, its figures and the span reading."""

from __future__ import annotations

import math
from typing import Any

import pytest

from medmesh_cli.bench.imaging import (
    BatchTimes,
    StudySplit,
    batches_of,
    full_batches,
    imaging_markdown,
    milestones,
    scored_in,
    serial_per_second,
    split_figures,
    study_split,
    worker_batches,
)
from medmesh_cli.ops.waterfall import CONVERSATION_ID

TOPIC = "medmesh.tasks.chest-opacity.v1"


def _span(
    name: str,
    span_id: str,
    start_ms: float,
    end_ms: float,
    attributes: dict[str, Any] | None = None,
    *,
    parent: str | None = None,
    links: tuple[str, ...] = (),
) -> dict[str, Any]:
    return {
        "trace_id": "t" * 32,
        "span_id": span_id,
        "parent_span_id": parent,
        "name": name,
        "start_ns": int(start_ms * 1e6),
        "end_ns": int(end_ms * 1e6),
        "attributes": attributes or {},
        "links": [{"trace_id": "t" * 32, "span_id": s} for s in links],
    }


def test_study_split_shares_the_images_span_and_leaves_the_rest_as_queueing() -> None:
    """Fetch and preprocessing share the images span's wall time as their sums do; inference is
    the rest of the batch span; queueing is what remains of the latency; the parts add up."""
    batch = BatchTimes(size=4, batch_ms=50.0, images_ms=30.0, fetch_ms=60.0, preprocess_ms=20.0)
    split = study_split(200.0, batch)
    assert split.fetch_ms == pytest.approx(22.5)
    assert split.preprocessing_ms == pytest.approx(7.5)
    assert split.inference_ms == pytest.approx(20.0)
    assert split.queueing_ms == pytest.approx(150.0)
    assert split.total_ms == pytest.approx(200.0)


def test_study_split_without_image_work_gives_the_images_span_to_preprocessing() -> None:
    """A batch whose images report no summed time (zero) still adds up, with no fetch share; an
    images span longer than its batch (clock rounding) is capped at the batch."""
    split = study_split(100.0, BatchTimes(1, 10.0, 12.0, 0.0, 0.0))
    assert split.fetch_ms == 0.0
    assert split.preprocessing_ms == pytest.approx(10.0)
    assert split.inference_ms == pytest.approx(0.0)
    assert split.total_ms == pytest.approx(100.0)


def test_split_figures_means_add_up_to_the_mean_latency() -> None:
    """Each part's mean, p50 and p99 by nearest rank; the shares of the means sum to 1."""
    splits = [StudySplit(1.0, 2.0, 3.0 + i, 4.0) for i in range(100)]
    figures = {f.part: f for f in split_figures(splits)}
    assert list(figures) == ["fetch", "preprocessing", "queueing", "inference"]
    assert figures["queueing"].mean_ms == pytest.approx(52.5)
    assert figures["queueing"].p50_ms == 52.0
    assert figures["queueing"].p99_ms == 101.0
    assert figures["fetch"].share == pytest.approx(1.0 / 59.5)
    assert sum(f.share for f in figures.values()) == pytest.approx(1.0)
    assert split_figures([]) == []


def test_worker_batches_pair_each_model_batch_with_its_images_span() -> None:
    """Batches of the model are read with their images span's times; another model's batch and
    a batch without an images span are left out."""
    chest = "chest-opacity"
    images = {"medmesh.fetch_ms": 45.0, "medmesh.preprocess_ms": 15.0, "medmesh.images": 3}
    records = [
        _span("inference.batch", "b1", 0, 40, {"medmesh.model": chest, "medmesh.batch_size": 3}),
        _span("inference.images", "i1", 1, 31, images, parent="b1"),
        _span("inference.batch", "b2", 0, 5, {"medmesh.model": "deterioration"}),
        _span("inference.images", "i2", 1, 2, parent="b2"),
        _span("inference.batch", "b3", 50, 60, {"medmesh.model": chest}),
    ]
    batches = worker_batches(records, "chest-opacity")
    assert batches == {"b1": BatchTimes(3, 40.0, 30.0, 45.0, 15.0)}


def test_scored_in_maps_each_task_to_the_batch_its_span_links() -> None:
    """A task's worker span links its batch; a task scored twice keeps the later batch; spans of
    other topics or without a link are ignored."""
    process = f"{TOPIC} process"
    records = [
        _span(process, "p1", 0, 1, {CONVERSATION_ID: "c1"}, links=("b1",)),
        _span(process, "p2", 0, 1, {CONVERSATION_ID: "c2"}, links=("b1",)),
        _span(process, "p3", 9, 10, {CONVERSATION_ID: "c2"}, links=("b2",)),
        _span("medmesh.inference.results process", "p4", 0, 1, {CONVERSATION_ID: "c3"},
              links=("b9",)),
        _span(process, "p5", 0, 1, {CONVERSATION_ID: "c4"}),
    ]  # fmt: skip
    assert scored_in(records, TOPIC) == {"c1": "b1", "c2": "b2"}


def test_milestones_measure_each_point_from_the_announce() -> None:
    """Each milestone is its span's start or end after the bench announced the study (same
    clock), over the studies' traces, and the last is the bench reading the report; a study
    without a trace and a milestone without a span count nothing."""

    def traced(span: dict[str, Any], trace: str, service: str) -> dict[str, Any]:
        return {**span, "trace_id": trace, "service": f"medmesh-{service}"}

    records = []
    for trace, cid, shift in (("a", "c1", 0.0), ("b", "c2", 100.0)):
        records += [
            traced(_span("POST /fhir/ImagingStudy", "s1", 1005, 1020 + shift), trace, "ingest"),
            traced(
                _span(f"{TOPIC} process", "s2", 1050 + shift, 1090 + shift,
                      {CONVERSATION_ID: cid}),
                trace,
                "inference-chest-opacity-v1",
            ),
        ]  # fmt: skip
    announced = {"c1": 1_000_000_000, "c2": 1_000_000_000, "c3": 1_000_000_000}
    read = {"c1": 1_200_000_000}
    found = {m.label: m for m in milestones(records, announced, read, TOPIC)}
    assert found["ingest's HTTP span started"].p50_ms == pytest.approx(5.0)
    assert found["ingest answered the announce"].count == 2
    assert found["ingest answered the announce"].p50_ms == pytest.approx(20.0)
    assert found["worker batch started"].p50_ms == pytest.approx(50.0)
    assert found["worker batch ended"].p99_ms == pytest.approx(190.0)
    assert found["report published"].count == 0
    assert found["report read by the bench"].count == 1
    assert found["report read by the bench"].p50_ms == pytest.approx(200.0)


def test_batches_of_cover_every_index_once() -> None:
    """Consecutive batches of at most the size, the last one shorter."""
    assert batches_of(5, 2) == [range(0, 2), range(2, 4), range(4, 5)]
    assert batches_of(0, 32) == []


def test_full_batches_wrap_around_so_every_call_is_full() -> None:
    """Every index is sent at least once, every batch has exactly the size, the last one filled
    from the start again."""
    assert full_batches(5, 2) == [[0, 1], [2, 3], [4, 0]]
    assert full_batches(3, 4) == [[0, 1, 2, 0]]
    assert full_batches(0, 4) == []


def test_serial_rate_is_one_over_the_summed_mean_times() -> None:
    """10 ms fetch, 5 ms preprocessing and Triton at 200/s (5 ms a study) give 50 studies/s;
    no measurement gives NaN."""
    assert serial_per_second([8.0, 12.0], [5.0], 200.0) == pytest.approx(50.0)
    assert math.isnan(serial_per_second([], [5.0], 200.0))
    assert math.isnan(serial_per_second([1.0], [5.0], 0.0))


def test_imaging_markdown_shows_the_ratio_the_split_and_the_hops() -> None:
    """The section names the pipeline/direct ratio, each series against direct Triton, the four
    parts and the hops."""
    summary = {
        "count": 10,
        "seconds": 1.0,
        "p50_ms": 1.0,
        "p90_ms": 1.0,
        "p99_ms": 1.0,
        "max_ms": 1.0,
    }
    triton = {
        "requests": 4,
        "executions": 4,
        "rows_per_execution": 2.5,
        "queue_us": 10.0,
        "compute_us": 900.0,
    }
    load = {
        "concurrency": 4,
        "series": {
            "summary": {**summary, "name": "(b) pipeline", "per_second": 20.0},
            "triton": triton,
        },
        "missing": 0,
        "non_2xx": 0,
        "split": [
            {"part": p, "mean_ms": 1.0, "p50_ms": 1.0, "p99_ms": 1.0, "share": 0.25}
            for p in ("fetch", "preprocessing", "queueing", "inference")
        ],
        "split_studies": 10,
        "worker_batches": 4,
        "mean_batch": 2.5,
        "per_image_fetch_ms": 3.0,
        "per_image_preprocess_ms": math.nan,
        "hops": [
            {
                "hop": TOPIC,
                "count": 10,
                "wait_p50_ms": 5.0,
                "wait_p99_ms": 9.0,
                "work_p50_ms": 2.0,
            }
        ],
    }
    report = {
        "model": "chest-opacity v1 (chest-opacity-cnn)",
        "studies": 10,
        "stow_s": 1.0,
        "series": {
            "direct-32": {
                "summary": {**summary, "name": "(a) direct", "per_second": 400.0},
                "triton": triton,
            },
        },
        "pipeline": [load],
        "pipeline_over_direct": 0.05,
        "serial_per_s": 40.0,
        "pipeline_over_serial": 0.5,
    }
    text = imaging_markdown(report)
    assert "Pipeline / direct Triton at max batch: 0.050" in text
    assert "| (b) pipeline | 10 | 20.0 | 1.00 | 1.00 | 1.00 | 1.00 | 0.05 |" in text
    assert "40.0 studies/s; pipeline / that: 0.50" in text
    assert "| queueing | 1.0 | 25% |" in text
    assert "4 in flight: 0 / 0" in text
    assert f"| {TOPIC} | 10 | 5.0 | 9.0 | 2.0 |" in text
