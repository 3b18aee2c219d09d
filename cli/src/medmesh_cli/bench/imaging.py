"""Issue 19: imaging studies per second through the pipeline against direct Triton on the same
preprocessed tensors, side by side in one run on the bench stack, and where a study's time goes.

- The studies: ``studies`` synthetic chest radiographs (``radiographs.synthetic_radiograph``,
  every other one with an opacity, 256 x 256), each a one-instance study of its own synthetic
  patient, stored in the stack's Orthanc by STOW-RS (plus a few unrecorded warm-up studies).
- (a) direct: the same instances fetched once with the worker's PACS client (``pacs.Pacs``,
  WADO-RS, one at a time) and preprocessed with the worker's code (``imaging.image_tensor`` with
  the spec's ImageSpec), each step timed; then the tensors, stacked as the worker stacks them
  (``tensors.input_batch``), sent to Triton by tritonclient gRPC, one call at a time, in batches
  of the spec's max batch and of 1, repeated for at least ``DIRECT_SECONDS``. Triton alone: the
  ceiling of any pipeline over this Triton.
- (b) pipeline: each study announced as a FHIR ImagingStudy (POST /fhir/ImagingStudy) in a
  closed loop of ``concurrency`` studies in flight (the next one is announced when a study's
  DiagnosticReport is on medmesh.reports.diagnostic); studies/s from the first announce to the
  last report, latency per study from its announce to its report.
- The time split of (b), from the services' spans (the stack's span file, sampling 100%): each
  study's worker span ("<task topic> process") links the ``inference.batch`` span of the batch
  that scored it. Fetch and preprocessing are that batch's ``inference.images`` span (its wall
  time, split between the two in proportion to the fetch and preprocessing times it sums over
  its images, which overlap: the worker fetches a few at a time); inference is the rest of the
  batch span (stacking the tensors and the Triton call). Queueing is the study's end-to-end
  latency minus those three: Kafka hops, waiting for a batch, and ingest's, the router's and
  reporting's work; the per-hop table (``topology.hop_figures``) shows where it goes.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt
from tritonclient.grpc import InferInput, InferRequestedOutput
from tritonclient.grpc.aio import InferenceServerClient

from medmesh_cli.bench.batching import TritonTimes, triton_times
from medmesh_cli.bench.common import run_id, with_count
from medmesh_cli.bench.pipeline import _reports_at_end
from medmesh_cli.bench.stats import Summary, markdown_table, percentile, summarize
from medmesh_cli.bench.topology import HopFigures, hop_figures
from medmesh_cli.devstack.radiographs import synthetic_radiograph
from medmesh_cli.devstack.stack import Stack
from medmesh_cli.devstack.studies import StudyIdentity, build_radiograph, imaging_study, stow
from medmesh_cli.ops.waterfall import CONVERSATION_ID, parse_spans
from medmesh_contracts import headers as h
from medmesh_contracts import topics
from medmesh_contracts.events import ImageReference
from medmesh_contracts.modelspec import ImageSpec, ModelSpec, VersionSpec, load_specs
from medmesh_inference.imaging import image_tensor
from medmesh_inference.pacs import Pacs
from medmesh_inference.tensors import input_batch
from medmesh_runtime.kafka import record_headers

MODEL = "chest-opacity"
VERSION = 1
WARMUP_STUDIES = 4
DIRECT_SECONDS = 3.0
STOW_CHUNK = 25  # instances per STOW-RS request (about 130 kB each)
STUDY_TIMEOUT_S = 60.0
# The BatchSpanProcessor exports every 5 s: wait that long before reading the run's spans.
SPAN_FLUSH_S = 6.0
SEED_BASE = 50_000  # generator seeds far from the fixtures' and the training script's
PARTS = ("fetch", "preprocessing", "queueing", "inference")


# --- the time split (pure) --------------------------------------------------------------------


@dataclass(frozen=True)
class BatchTimes:
    """One worker batch, from its spans: its size and where its wall time went."""

    size: int
    batch_ms: float  # the inference.batch span: images, tensors and the Triton call
    images_ms: float  # the inference.images span (wall time of fetching and preprocessing)
    fetch_ms: float  # summed over the batch's images (they overlap)
    preprocess_ms: float  # summed over the batch's images


@dataclass(frozen=True)
class StudySplit:
    """One study's end-to-end latency in four parts that add up to it."""

    fetch_ms: float
    preprocessing_ms: float
    queueing_ms: float
    inference_ms: float

    @property
    def total_ms(self) -> float:
        """The end-to-end latency the parts add up to."""
        return self.fetch_ms + self.preprocessing_ms + self.queueing_ms + self.inference_ms


def study_split(end_to_end_ms: float, batch: BatchTimes) -> StudySplit:
    """The study's latency split by the batch that scored it: the images span's wall time shared
    between fetch and preprocessing as their summed times are, the rest of the batch span as
    inference, and whatever is left of the end-to-end latency as queueing."""
    images_ms = min(batch.images_ms, batch.batch_ms)
    image_work = batch.fetch_ms + batch.preprocess_ms
    fetch_ms = images_ms * batch.fetch_ms / image_work if image_work > 0 else 0.0
    preprocessing_ms = images_ms - fetch_ms
    inference_ms = batch.batch_ms - images_ms
    return StudySplit(
        fetch_ms=fetch_ms,
        preprocessing_ms=preprocessing_ms,
        queueing_ms=end_to_end_ms - fetch_ms - preprocessing_ms - inference_ms,
        inference_ms=inference_ms,
    )


@dataclass(frozen=True)
class PartFigures:
    """One part of the split over all studies: mean, percentiles and share of the mean latency."""

    part: str
    mean_ms: float
    p50_ms: float
    p99_ms: float
    share: float


def split_figures(splits: Sequence[StudySplit]) -> list[PartFigures]:
    """Each part's mean, p50, p99 and share of the mean end-to-end latency (the means add up)."""
    if not splits:
        return []
    total = sum(s.total_ms for s in splits) / len(splits)
    figures = []
    for part in PARTS:
        values = sorted(getattr(s, f"{part}_ms") for s in splits)
        mean = sum(values) / len(values)
        figures.append(
            PartFigures(
                part,
                mean,
                percentile(values, 50),
                percentile(values, 99),
                mean / total if total > 0 else math.nan,
            )
        )
    return figures


def worker_batches(records: Iterable[Mapping[str, Any]], model: str) -> dict[str, BatchTimes]:
    """The ``model``'s worker batches in span records (the span file's JSON objects), by the
    span id of their ``inference.batch`` span; a batch without its images span is skipped."""
    batches: dict[str, Mapping[str, Any]] = {}
    images: dict[str, Mapping[str, Any]] = {}
    for record in records:
        if record["name"] == "inference.batch" and record["attributes"].get("medmesh.model") == (
            model
        ):
            batches[record["span_id"]] = record
        elif record["name"] == "inference.images" and record.get("parent_span_id"):
            images[record["parent_span_id"]] = record
    found = {}
    for span_id, batch in batches.items():
        image = images.get(span_id)
        if image is None:
            continue
        found[span_id] = BatchTimes(
            size=int(batch["attributes"].get("medmesh.batch_size", 0)),
            batch_ms=_duration_ms(batch),
            images_ms=_duration_ms(image),
            fetch_ms=float(image["attributes"].get("medmesh.fetch_ms", 0.0)),
            preprocess_ms=float(image["attributes"].get("medmesh.preprocess_ms", 0.0)),
        )
    return found


def scored_in(records: Iterable[Mapping[str, Any]], task_topic: str) -> dict[str, str]:
    """Correlation id -> span id of the batch that scored it, from the worker's per-task spans
    ("<task topic> process", linking their batch); a task scored twice keeps its later batch."""
    latest: dict[str, tuple[int, str]] = {}
    for record in records:
        if record["name"] != f"{task_topic} process" or not record.get("links"):
            continue
        correlation_id = record["attributes"].get(CONVERSATION_ID)
        if not correlation_id:
            continue
        start = int(record["start_ns"])
        if correlation_id not in latest or latest[correlation_id][0] < start:
            latest[correlation_id] = (start, record["links"][0]["span_id"])
    return {c: batch for c, (_, batch) in latest.items()}


def milestone_spans(task_topic: str) -> tuple[tuple[str, str, str, str], ...]:
    """(label, service, span name, "start" or "end") of each milestone of a study's trace, in
    pipeline order; the service is the span file's service name without ``medmesh-``."""
    worker = f"inference-{MODEL}-v{VERSION}"
    return (
        ("ingest's HTTP span started", "ingest", "POST /fhir/ImagingStudy", "start"),
        ("ingest answered the announce", "ingest", "POST /fhir/ImagingStudy", "end"),
        ("ingest published the request", "ingest", f"{topics.INFERENCE_REQUESTS} publish", "start"),
        ("router took the request", "router", f"{topics.INFERENCE_REQUESTS} process", "start"),
        ("router published the task", "router", f"{task_topic} publish", "start"),
        ("worker batch started", worker, f"{task_topic} process", "start"),
        ("worker batch ended", worker, f"{task_topic} process", "end"),
        ("reporting took the result", "reporting", f"{topics.INFERENCE_RESULTS} process", "start"),
        ("report published", "reporting", f"{topics.REPORTS_DIAGNOSTIC} publish", "start"),
    )


@dataclass(frozen=True)
class Milestone:
    """When, after the bench announced them, the studies reached one point."""

    label: str
    count: int
    p50_ms: float
    p99_ms: float


def milestones(
    records: Iterable[Mapping[str, Any]],
    announced_ns: Mapping[str, int],
    read_ns: Mapping[str, int],
    task_topic: str,
) -> list[Milestone]:
    """Per milestone (``milestone_spans``, then the report read by the bench), its time after
    the bench announced the study, over the studies' traces (a trace is found by any span
    carrying the id). The bench's times are wall-clock nanoseconds, the spans' clock."""
    traces: dict[str, list[Mapping[str, Any]]] = {}
    by_request: dict[str, str] = {}
    for record in records:
        traces.setdefault(record["trace_id"], []).append(record)
        for key in (CONVERSATION_ID, "medmesh.correlation_id"):
            value = record["attributes"].get(key)
            if value:
                by_request.setdefault(str(value), record["trace_id"])
    points = milestone_spans(task_topic)
    offsets: list[list[float]] = [[] for _ in range(len(points) + 1)]
    for correlation_id, announced in announced_ns.items():
        trace = traces.get(by_request.get(correlation_id, ""), [])
        found = {
            (str(r.get("service") or "").removeprefix("medmesh-"), r["name"]): r
            for r in sorted(trace, key=lambda r: int(r["start_ns"]), reverse=True)
        }
        for index, (_, service, name, edge) in enumerate(points):
            span = found.get((service, name))
            if span is not None:
                offsets[index].append((int(span[f"{edge}_ns"]) - announced) / 1e6)
        if correlation_id in read_ns:
            offsets[-1].append((read_ns[correlation_id] - announced) / 1e6)
    labels = [label for label, *_ in points] + ["report read by the bench"]
    result = []
    for label, values in zip(labels, offsets, strict=True):
        ordered = sorted(values)
        result.append(
            Milestone(label, len(ordered), percentile(ordered, 50), percentile(ordered, 99))
        )
    return result


def _duration_ms(record: Mapping[str, Any]) -> float:
    return (int(record["end_ns"]) - int(record["start_ns"])) / 1e6


def batches_of(count: int, size: int) -> list[range]:
    """Indices 0..count-1 in consecutive batches of at most ``size``."""
    return [range(i, min(i + size, count)) for i in range(0, count, size)]


def full_batches(count: int, size: int) -> list[list[int]]:
    """Indices 0..count-1 in consecutive batches of exactly ``size``, the last one filled up
    from the start again: every index is sent at least once and every call is full, as the
    worker's would be under a backlog."""
    if count == 0:
        return []
    calls = -(-count // size)
    return [[(k * size + j) % count for j in range(size)] for k in range(calls)]


# --- the studies and the direct series --------------------------------------------------------


@dataclass(frozen=True)
class BenchStudy:
    """One stored study and the patient it is announced for."""

    identity: StudyIdentity
    patient: str
    resource_id: str


def store_studies(dicomweb_url: str, count: int, run: str) -> list[BenchStudy]:
    """``count`` one-instance studies, every other one with an opacity, stored by STOW-RS."""
    studies = [
        BenchStudy(
            StudyIdentity.new(f"bench-{run}-{i}"),
            f"bench-img-{run}-{i}",
            f"cxr-{run}-{i}",
        )
        for i in range(count)
    ]
    for chunk in batches_of(count, STOW_CHUNK):
        datasets = [
            build_radiograph(synthetic_radiograph(SEED_BASE + i, i % 2 == 0), studies[i].identity)
            for i in chunk
        ]
        stow(dicomweb_url, datasets)
    return studies


def _reference(study: BenchStudy, dicomweb_url: str) -> ImageReference:
    return ImageReference(
        dicomweb_url=dicomweb_url,
        study_uid=study.identity.study_uid,
        series_uid=study.identity.series_uid,
        instance_uid=study.identity.sop_uid,
    )


def _image_spec(spec: ModelSpec, version: VersionSpec) -> tuple[str, ImageSpec]:
    """The version's one image tensor's name and the ImageSpec of its input."""
    for tensor in version.triton.inputs:
        if tensor.feed == "image":
            (name,) = tensor.inputs
            image = spec.input(name).image
            if image is not None:
                return tensor.name, image
    raise ValueError(f"{spec.name} v{version.version} feeds no image tensor")


async def fetch_and_prepare(
    dicomweb_url: str, studies: Sequence[BenchStudy], image: ImageSpec
) -> tuple[list[npt.NDArray[np.float32]], list[float], list[float]]:
    """Each study's tensor, fetched and preprocessed with the worker's code one at a time; the
    fetch and preprocessing times (ms) of each."""
    pacs = Pacs([dicomweb_url])
    tensors, fetch_ms, preprocess_ms = [], [], []
    try:
        for study in studies:
            started = time.perf_counter()
            data = await pacs.fetch(_reference(study, dicomweb_url), image.max_instance_bytes)
            fetched = time.perf_counter()
            prepared = image_tensor(data, image)
            done = time.perf_counter()
            tensors.append(prepared.tensor)
            fetch_ms.append((fetched - started) * 1000)
            preprocess_ms.append((done - fetched) * 1000)
    finally:
        await pacs.close()
    return tensors, fetch_ms, preprocess_ms


@dataclass(frozen=True)
class Series:
    """One throughput series in studies per second, with Triton's view of it."""

    summary: Summary
    triton: TritonTimes | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "summary": self.summary.as_dict(),
            "triton": self.triton.as_dict() if self.triton else None,
        }


async def _statistics(client: InferenceServerClient, version: VersionSpec) -> dict[str, Any]:
    target = version.triton
    answer: dict[str, Any] = await client.get_inference_statistics(
        target.model, str(target.version), as_json=True
    )
    return answer


async def direct_triton(
    client: InferenceServerClient,
    version: VersionSpec,
    tensor_name: str,
    tensors: Sequence[npt.NDArray[np.float32]],
    batch: int,
) -> Series:
    """The tensors sent to Triton in calls of ``batch`` rows, one call at a time, in passes over
    all of them until ``DIRECT_SECONDS`` have passed; studies per second, latency per call."""
    target = version.triton
    datatype = next(t.datatype for t in target.inputs if t.name == tensor_name)
    calls = [
        input_batch(version, [{tensor_name: tensors[i].ravel()} for i in indices])[tensor_name]
        for indices in full_batches(len(tensors), batch)
    ]
    outputs = [InferRequestedOutput(n) for n in version.output_tensor_names]

    async def call(data: npt.NDArray[Any]) -> None:
        tensor = InferInput(tensor_name, list(data.shape), datatype)
        tensor.set_data_from_numpy(data)
        await client.infer(
            target.model, [tensor], model_version=str(target.version), outputs=outputs
        )

    for data in calls[:3]:  # warm-up
        await call(data)
    before = await _statistics(client, version)
    latencies: list[float] = []
    scored = 0
    started = time.perf_counter()
    while scored == 0 or time.perf_counter() - started < DIRECT_SECONDS:
        for data in calls:
            t0 = time.perf_counter()
            await call(data)
            latencies.append((time.perf_counter() - t0) * 1000)
            scored += len(data)
    elapsed = time.perf_counter() - started
    summary = with_count(
        summarize(f"(a) direct Triton gRPC, batch {batch}", latencies, elapsed), scored
    )
    times = triton_times(
        before, await _statistics(client, version), target.model, str(target.version)
    )
    return Series(summary, times)


# --- the pipeline series ----------------------------------------------------------------------


@dataclass
class LoopResult:
    """What the closed loop saw: per correlation id its announce and report times."""

    sent: dict[str, float]
    arrived: dict[str, float]
    started: float
    non_2xx: int
    # The same moments on the wall clock (ns), the clock of the services' spans.
    sent_ns: dict[str, int]
    arrived_ns: dict[str, int]

    @property
    def missing(self) -> int:
        """Announced studies whose report never came."""
        return len(self.sent.keys() - self.arrived.keys())

    def latencies_ms(self) -> dict[str, float]:
        """Announce-to-report latency of every reported study."""
        return {c: (self.arrived[c] - t) * 1000 for c, t in self.sent.items() if c in self.arrived}

    def summary(self, name: str) -> Summary:
        """Studies per second (first announce to last report) and their latencies."""
        last = max(self.arrived.values(), default=self.started)
        return summarize(name, list(self.latencies_ms().values()), last - self.started)


async def closed_loop(
    ingest_url: str,
    bootstrap: str,
    resources: Sequence[dict[str, Any]],
    concurrency: int,
) -> LoopResult:
    """Announce each ImagingStudy, ``concurrency`` at a time, each client waiting for its
    study's report before announcing the next."""
    consumer = await _reports_at_end(bootstrap)
    arrived: dict[str, float] = {}
    waiting: dict[str, asyncio.Future[None]] = {}
    sent: dict[str, float] = {}
    sent_ns: dict[str, int] = {}
    arrived_ns: dict[str, int] = {}
    non_2xx = 0

    async def collect() -> None:
        async for record in consumer:
            now, now_ns = time.perf_counter(), time.time_ns()
            key = record_headers(record).get(h.CORRELATION_ID)
            if key is None:
                continue
            arrived.setdefault(key, now)
            arrived_ns.setdefault(key, now_ns)
            future = waiting.pop(key, None)
            if future is not None and not future.done():
                future.set_result(None)

    collector = asyncio.create_task(collect())
    pending = iter(resources)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=ingest_url, timeout=60, limits=limits) as client:

        async def announcer() -> None:
            nonlocal non_2xx
            for resource in pending:
                at, at_ns = time.perf_counter(), time.time_ns()
                answer = await client.post(
                    "/fhir/ImagingStudy",
                    content=json.dumps(resource).encode(),
                    headers={"content-type": "application/fhir+json"},
                )
                if answer.status_code // 100 != 2:
                    non_2xx += 1
                    continue
                futures = []
                for correlation_id in answer.headers.get(h.CORRELATION_ID, "").split(","):
                    if not correlation_id:
                        continue
                    sent[correlation_id] = at
                    sent_ns[correlation_id] = at_ns
                    if correlation_id not in arrived:
                        future = asyncio.get_running_loop().create_future()
                        waiting[correlation_id] = future
                        futures.append(future)
                if futures:
                    # A lost report counts as missing; the loop goes on with the next study.
                    await asyncio.wait(futures, timeout=STUDY_TIMEOUT_S)

        started = time.perf_counter()
        await asyncio.gather(*(announcer() for _ in range(concurrency)))
    collector.cancel()
    await consumer.stop()
    return LoopResult(sent, arrived, started, non_2xx, sent_ns, arrived_ns)


# --- the series -------------------------------------------------------------------------------


def _span_records(path: Path, offset: int) -> list[str]:
    """The span file's complete lines appended after ``offset`` bytes."""
    if not path.exists():
        return []
    with path.open("rb") as spans:
        spans.seek(offset)
        text = spans.read().decode(errors="replace")
    return [line for line in text.splitlines() if line.endswith("}")]


def _file_size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


async def _pipeline_load(
    stack: Stack,
    client: InferenceServerClient,
    version: VersionSpec,
    resources: Sequence[dict[str, Any]],
    concurrency: int,
) -> dict[str, Any]:
    """One closed-loop load through the pipeline, with Triton's view and the split of each
    study's time from the spans the load left in the span file."""
    offset = _file_size(stack.config.trace_file)
    before = await _statistics(client, version)
    loop = await closed_loop(
        stack.config.ingest_url, stack.config.bootstrap, resources, concurrency
    )
    target = version.triton
    triton = triton_times(
        before, await _statistics(client, version), target.model, str(target.version)
    )
    await asyncio.sleep(SPAN_FLUSH_S)
    lines = _span_records(stack.config.trace_file, offset)
    records = [json.loads(line) for line in lines]
    batches = worker_batches(records, MODEL)
    scoring = scored_in(records, topics.model_task_topic(MODEL, VERSION))
    splits = [
        study_split(latency, batches[scoring[c]])
        for c, latency in loop.latencies_ms().items()
        if scoring.get(c) in batches
    ]
    used = {scoring[c] for c in loop.sent if scoring.get(c) in batches}
    figures, _ = hop_figures(parse_spans(lines), loop.sent)
    points = milestones(
        records, loop.sent_ns, loop.arrived_ns, topics.model_task_topic(MODEL, VERSION)
    )
    label = "one study in flight" if concurrency == 1 else f"closed loop of {concurrency}"
    return {
        "concurrency": concurrency,
        "series": Series(loop.summary(f"(b) pipeline, {label}"), triton).as_dict(),
        "missing": loop.missing,
        "non_2xx": loop.non_2xx,
        "split": [asdict(f) for f in split_figures(splits)],
        "split_studies": len(splits),
        "worker_batches": len(used),
        "mean_batch": sum(batches[b].size for b in used) / len(used) if used else math.nan,
        "per_image_fetch_ms": _per_image(batches, used, "fetch_ms"),
        "per_image_preprocess_ms": _per_image(batches, used, "preprocess_ms"),
        "hops": [asdict(f) for f in figures],
        "milestones": [asdict(m) for m in points],
    }


async def run_imaging(stack: Stack, studies: int = 200, concurrency: int = 32) -> dict[str, Any]:
    """Store the studies; the direct series; the pipeline at ``concurrency`` studies in flight
    (its throughput) and at one (its unloaded latency, over a fifth as many studies), each with
    the split of its time."""
    spec = load_specs(stack.config.specs_dir)[MODEL]
    version = spec.version(VERSION)
    tensor_name, image = _image_spec(spec, version)
    url = stack.config.dicomweb_url
    unloaded = max(10, studies // 5)
    stow_started = time.perf_counter()
    stored = await asyncio.to_thread(
        store_studies, url, WARMUP_STUDIES + studies + unloaded, run_id()
    )
    stow_s = time.perf_counter() - stow_started
    measured = slice(WARMUP_STUDIES, WARMUP_STUDIES + studies)
    # The warm-up studies go first, unrecorded: the first fetch opens the connection.
    all_tensors, all_fetch_ms, all_preprocess_ms = await fetch_and_prepare(
        url, stored[: measured.stop], image
    )
    tensors, fetch_ms = all_tensors[measured], all_fetch_ms[measured]
    preprocess_ms = all_preprocess_ms[measured]
    series: dict[str, Series] = {
        "fetch": Series(
            summarize("(a) fetch alone (WADO-RS, one at a time)", fetch_ms, sum(fetch_ms) / 1000)
        ),
        "preprocessing": Series(
            summarize(
                "(a) preprocessing alone (image_tensor)", preprocess_ms, sum(preprocess_ms) / 1000
            )
        ),
    }
    max_batch = version.triton.max_batch_size
    resources = [imaging_study(s.identity, s.resource_id, s.patient, url) for s in stored]
    client = InferenceServerClient(url=f"127.0.0.1:{stack.config.ports.triton_grpc}")
    try:
        for batch in sorted({max_batch, 1}, reverse=True):
            series[f"direct-{batch}"] = await direct_triton(
                client, version, tensor_name, tensors, batch
            )
        await closed_loop(
            stack.config.ingest_url, stack.config.bootstrap, resources[:WARMUP_STUDIES], 1
        )
        loads = [
            await _pipeline_load(stack, client, version, resources[measured], concurrency),
            await _pipeline_load(stack, client, version, resources[measured.stop :], 1),
        ]
    finally:
        await client.close()
    direct = series[f"direct-{max_batch}"].summary.per_second
    piped = loads[0]["series"]["summary"]["per_second"]
    serial = serial_per_second(fetch_ms, preprocess_ms, direct)
    return {
        "model": f"{MODEL} v{VERSION} ({version.triton.model})",
        "studies": studies,
        "stow_s": stow_s,
        "series": {name: s.as_dict() for name, s in series.items()},
        "pipeline": loads,
        "pipeline_over_direct": piped / direct if direct else math.nan,
        "serial_per_s": serial,
        "pipeline_over_serial": piped / serial if serial else math.nan,
    }


def serial_per_second(
    fetch_ms: Sequence[float], preprocess_ms: Sequence[float], triton_per_s: float
) -> float:
    """Studies per second of one process that fetches, preprocesses and scores (at Triton's
    measured rate) one study after another: one over the sum of the mean times (derived)."""
    if not fetch_ms or not preprocess_ms or not triton_per_s > 0:
        return math.nan
    per_study_s = (
        sum(fetch_ms) / len(fetch_ms) / 1000
        + sum(preprocess_ms) / len(preprocess_ms) / 1000
        + 1 / triton_per_s
    )
    return 1 / per_study_s


def _per_image(batches: Mapping[str, BatchTimes], used: Iterable[str], field: str) -> float:
    """The mean of a time the worker sums over a batch's images, per image."""
    chosen = [batches[b] for b in used]
    images = sum(b.size for b in chosen)
    return sum(getattr(b, field) for b in chosen) / images if images else math.nan


def imaging_markdown(report: dict[str, Any]) -> str:
    """The imaging section: studies/s side by side, Triton's view, each load's split and hops."""
    direct = next(s for k, s in report["series"].items() if k.startswith("direct-"))
    series = [*report["series"].values(), *(load["series"] for load in report["pipeline"])]
    rows = [Summary(**s["summary"]) for s in series]
    lines = [
        f"{report['studies']} studies ({report['model']}) and a fifth as many for the unloaded "
        f"pipeline, stored by STOW-RS in {report['stow_s']:.1f} s. Missing reports / answers "
        "other than 2xx per load: "
        + ", ".join(
            f"{load['concurrency']} in flight: {load['missing']} / {load['non_2xx']}"
            for load in report["pipeline"]
        )
        + ".\n",
        markdown_table(rows, baseline=direct["summary"]["name"]),
        "\nLatency: (a) fetch and preprocessing per study, direct Triton per gRPC call; (b) per "
        "study, from its announce to its report. (a) fetch and preprocessing: per second is one "
        "at a time, over the time they took.\n",
        f"**Pipeline / direct Triton at max batch: {report['pipeline_over_direct']:.3f}** "
        "(studies per second).\n",
        "Fetch, preprocessing and Triton at max batch one after another in one process (derived "
        f"from the (a) rows' mean times): {report['serial_per_s']:.1f} studies/s; pipeline / "
        f"that: {report['pipeline_over_serial']:.2f}.\n",
        "| series | Triton requests | rows/exec | queue us/req | compute us/req |",
        "|---|---|---|---|---|",
    ]
    for s in series:
        t = s["triton"]
        if t:
            lines.append(
                f"| {s['summary']['name']} | {t['requests']} | {t['rows_per_execution']:.1f} "
                f"| {t['queue_us']:.0f} | {t['compute_us']:.0f} |"
            )
    for load in report["pipeline"]:
        lines += ["", _split_markdown(load)]
    return "\n".join(lines) + "\n"


def _split_markdown(load: dict[str, Any]) -> str:
    lines = [
        f"### Where a study's time goes: {load['series']['summary']['name']} "
        f"({load['split_studies']} studies, {load['worker_batches']} worker batches of "
        f"{load['mean_batch']:.1f} on average)\n",
        "| part | mean ms | share of mean | p50 ms | p99 ms |",
        "|---|---|---|---|---|",
    ]
    for part in load["split"]:
        lines.append(
            f"| {part['part']} | {part['mean_ms']:.1f} | {part['share']:.0%} "
            f"| {part['p50_ms']:.1f} | {part['p99_ms']:.1f} |"
        )
    lines += [
        "",
        f"Per image, as the worker sums them (overlapping, a few at a time): fetch "
        f"{load['per_image_fetch_ms']:.1f} ms, preprocessing "
        f"{load['per_image_preprocess_ms']:.1f} ms.\n",
        "| hop | n | wait p50 ms | wait p99 ms | work p50 ms |",
        "|---|---|---|---|---|",
    ]
    for hop in load["hops"]:
        figures = HopFigures(**hop)
        lines.append(
            f"| {figures.hop} | {figures.count} | {figures.wait_p50_ms:.1f} "
            f"| {figures.wait_p99_ms:.1f} | {figures.work_p50_ms:.1f} |"
        )
    lines += [
        "",
        "A study's way, in ms after the bench announced it (the services' spans and the bench, "
        "on the same wall clock; each row's percentiles on their own):\n",
        "| milestone | n | p50 ms | p99 ms |",
        "|---|---|---|---|",
        *(
            f"| {m['label']} | {m['count']} | {m['p50_ms']:.1f} | {m['p99_ms']:.1f} |"
            for m in load.get("milestones", [])
        ),
    ]
    return "\n".join(lines) + "\n"
