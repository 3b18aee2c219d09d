"""Issue 5: the batching gain, on the bench stack's Triton, side by side in one run.

- (a) direct: a tritonclient gRPC loop, one call at a time, at the worker's batch sizes (the floor
  of what any worker can reach);
- (b) worker: the model's v1 worker fed a burst of RunInference tasks from Kafka, timed until
  every result is on medmesh.inference.results;
- (c) batching off: the same burst through a worker started with MEDMESH_WORKER_MAX_BATCH=1.

Triton's own queue and compute times (get_inference_statistics, deltas over each series) are
reported beside them. Targets: (b) >= 80% of (a) at the spec's max batch, (b) >= 5x (c).

Any model of the specs can be measured (``model``): the tasks' inputs come from the spec, a
waveform input gets a synthetic ECG, and (a) sends exactly the rows the worker builds
(``medmesh_inference.tensors``). NEWS2 costs microseconds per row in Triton, so its (b)/(a)
measures the worker's per-message cost; the ECG screen costs about a millisecond per row.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt
from aiokafka import AIOKafkaProducer
from google.protobuf import text_format
from tritonclient.grpc import InferInput, InferRequestedOutput
from tritonclient.grpc.aio import InferenceServerClient
from tritonclient.grpc.model_config_pb2 import ModelConfig

from medmesh_cli.bench.common import (
    Message,
    Ratio,
    Sink,
    bench_task,
    burst_summary,
    header_value,
    publish_burst,
    ratio,
    ratios_markdown,
    run_id,
    with_count,
)
from medmesh_cli.bench.stats import Summary, summarize
from medmesh_cli.devstack.paths import repo_root
from medmesh_cli.devstack.process import ManagedProcess, wait_until
from medmesh_cli.devstack.stack import ServiceSpec, Stack, service_environment, service_specs
from medmesh_contracts import headers as h
from medmesh_contracts import topics
from medmesh_contracts.events import ModelInput, RunInference, schema_of, to_wire
from medmesh_contracts.modelspec import ModelSpec, load_specs
from medmesh_inference.tensors import input_batch, input_rows

VERSION = 1
ECG_RR_S = (0.8, 0.45, 1.1)  # regular RR interval; range of an irregular one (seconds)


def synthetic_ecg(
    samples: int, period_ms: float, *, irregular: bool, seed: int
) -> npt.NDArray[np.float64]:
    """A one-lead ECG in mV: Gaussian QRS spikes, a T wave and noise; RR regular or random."""
    rng = np.random.default_rng(seed)
    t = np.arange(samples) * period_ms / 1000
    signal = rng.normal(0.0, 0.02, samples)
    beat = 0.3
    while beat < t[-1]:
        signal += 1.2 * np.exp(-(((t - beat) / 0.012) ** 2))
        signal += 0.25 * np.exp(-(((t - beat - 0.25) / 0.05) ** 2))
        beat += rng.uniform(ECG_RR_S[1], ECG_RR_S[2]) if irregular else ECG_RR_S[0]
    return signal


def bench_model_task(spec: ModelSpec, index: int, run: str, version: int = VERSION) -> RunInference:
    """A task for ``spec``'s ``version`` with inputs from the spec: the vital signs the other series
    send for scalar inputs (the default where a spec names another), a synthetic ECG (every
    other one irregular) for a waveform input."""
    task = bench_task(index, run, version)
    known = {i.name: i for i in task.request.inputs}
    inputs = []
    for column in spec.inputs:
        if column.waveform is not None:
            samples = synthetic_ecg(
                column.waveform.samples,
                column.waveform.period_ms,
                irregular=index % 2 == 1,
                seed=index,
            )
            rounded = tuple(round(float(v), 4) for v in samples)
            inputs.append(
                ModelInput(
                    name=column.name,
                    value=rounded[-1],  # a waveform's value is its last sample (see ModelInput)
                    unit=column.unit,
                    samples=rounded,
                    period_ms=column.waveform.period_ms,
                    duration_s=(column.waveform.samples - 1) * column.waveform.period_ms / 1000,
                )
            )
        elif column.name in known:
            inputs.append(known[column.name])
        else:
            inputs.append(
                ModelInput(name=column.name, value=column.default or 1.0, unit=column.unit)
            )
    request = task.request.model_copy(update={"model": spec.name, "inputs": tuple(inputs)})
    return task.model_copy(update={"request": request})


@dataclass(frozen=True)
class TritonTimes:
    """Triton's statistics over one series: requests, executions and mean times per request."""

    requests: int
    executions: int
    rows_per_execution: float
    queue_us: float
    compute_us: float

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


def _model_stats(statistics: dict[str, Any], model: str, version: str) -> dict[str, Any]:
    for entry in statistics.get("model_stats", []):
        if entry.get("name") == model and str(entry.get("version")) == version:
            found: dict[str, Any] = entry
            return found
    return {}


def triton_times(
    before: dict[str, Any], after: dict[str, Any], model: str, version: str
) -> TritonTimes:
    """What happened between two get_inference_statistics(as_json=True) answers (pure).

    Counts arrive as strings (protobuf JSON int64) or ints; times are nanoseconds summed over
    requests, so the means are per request.
    """
    b, a = _model_stats(before, model, version), _model_stats(after, model, version)

    def count(stats: dict[str, Any], *path: str) -> int:
        value: Any = stats
        for key in path:
            value = value.get(key, {}) if isinstance(value, dict) else {}
        return int(value) if isinstance(value, int | str) and str(value) else 0

    def delta(*path: str) -> int:
        return count(a, *path) - count(b, *path)

    rows = delta("inference_count")
    executions = delta("execution_count")
    requests = delta("inference_stats", "success", "count")
    return TritonTimes(
        requests=requests,
        executions=executions,
        rows_per_execution=rows / executions if executions else 0.0,
        queue_us=delta("inference_stats", "queue", "ns") / requests / 1000 if requests else 0.0,
        compute_us=(
            delta("inference_stats", "compute_infer", "ns") / requests / 1000 if requests else 0.0
        ),
    )


@dataclass(frozen=True)
class Series:
    """One batching series: throughput in rows per second, with Triton's view of it."""

    summary: Summary
    triton: TritonTimes
    missing: int = 0

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "summary": self.summary.as_dict(),
            "triton": self.triton.as_dict(),
            "missing": self.missing,
        }


class _Statistics:
    def __init__(self, client: InferenceServerClient, triton_model: str, version: str) -> None:
        self.client = client
        self.triton_model = triton_model
        self.version = version

    async def snapshot(self) -> dict[str, Any]:
        answer: dict[str, Any] = await self.client.get_inference_statistics(
            self.triton_model, self.version, as_json=True
        )
        return answer


async def direct_loop(
    client: InferenceServerClient, spec: ModelSpec, batch: int, rows: int, version: int = VERSION
) -> Summary:
    """Sequential tritonclient calls of ``batch`` rows until ``rows`` rows are scored."""
    run = run_id()
    served = spec.version(version)
    data = input_batch(
        served,
        [input_rows(bench_model_task(spec, i, run, version), spec, served) for i in range(batch)],
    )
    outputs = [InferRequestedOutput(n) for n in served.output_tensor_names]
    target = served.triton

    async def call() -> None:
        tensors = []
        for declared in target.inputs:
            tensor = InferInput(declared.name, list(data[declared.name].shape), declared.datatype)
            tensor.set_data_from_numpy(data[declared.name])
            tensors.append(tensor)
        await client.infer(
            target.model, tensors, model_version=str(target.version), outputs=outputs
        )

    for _ in range(5):  # warm-up
        await call()
    calls = max(1, rows // batch)
    latencies = []
    started = time.perf_counter()
    for _ in range(calls):
        t0 = time.perf_counter()
        await call()
        latencies.append((time.perf_counter() - t0) * 1000)
    summary = summarize(f"(a) direct gRPC, batch {batch}", latencies, time.perf_counter() - started)
    return with_count(summary, calls * batch)


async def worker_burst(
    bootstrap: str, spec: ModelSpec, tasks: int, label: str, version: int = VERSION
) -> tuple[Summary, int]:
    """Publish ``tasks`` RunInference to the version's task topic; time until all results are
    out."""
    run = run_id()
    messages: list[Message] = []
    for i in range(tasks):
        task = bench_model_task(spec, i, run, version)
        headers = [
            (h.CORRELATION_ID, task.correlation_id.encode()),
            (h.SCHEMA, schema_of(RunInference).encode()),
        ]
        messages.append(
            (task.correlation_id, to_wire(task), task.request.patient_pseudonym.encode(), headers)
        )
    sink = Sink(
        bootstrap,
        [topics.INFERENCE_RESULTS, topics.INFERENCE_FAILED],
        lambda r: header_value(r, h.CORRELATION_ID),
    )
    await sink.start()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True)
    await producer.start()
    try:
        sent = await publish_burst(producer, topics.model_task_topic(spec.name, version), messages)
        missing = await sink.wait_for(sent, timeout_s=60 + tasks / 20)
    finally:
        await producer.stop()
        await sink.stop()
    return burst_summary(label, sent, sink.arrived), missing


def _start_unbatched_worker(stack: Stack, worker: str) -> tuple[ManagedProcess, int]:
    """The version's worker with MEDMESH_WORKER_MAX_BATCH=1, on a free port past the stack's workers."""
    spec = next(s for s in service_specs(stack.config) if s.name == worker)
    port = max(s.port for s in service_specs(stack.config)) + 1
    unbatched = ServiceSpec(
        f"{worker}-unbatched",
        spec.module,
        port,
        {**spec.env, "MEDMESH_WORKER_PORT": str(port), "MEDMESH_WORKER_MAX_BATCH": "1"},
    )
    process = ManagedProcess(
        unbatched.name,
        [sys.executable, "-m", unbatched.module],
        stack.config.state_dir / f"{unbatched.name}.log",
        env=service_environment(stack.config, unbatched),
        cwd=repo_root(),
    )
    process.start()
    return process, port


def backend_of(stack: Stack, triton_model: str) -> str:
    """How the model folder says it runs: its platform (e.g. onnxruntime_onnx) or backend."""
    config = ModelConfig()
    text_format.Parse(
        (stack.config.model_repository / triton_model / "config.pbtxt").read_text(), config
    )
    return str(config.platform or config.backend)


def _ready(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2.0).status_code == 204
    except httpx.HTTPError:
        return False


async def run_batching(
    stack: Stack,
    tasks: int = 2000,
    direct_rows: int = 4000,
    model: str = "deterioration",
    version: int = VERSION,
) -> dict[str, Any]:
    """The three series and Triton's times for one model version, in one run on the stack's
    Triton."""
    spec = load_specs(stack.config.specs_dir)[model]
    target = spec.version(version).triton
    max_batch = target.max_batch_size
    triton_model, triton_version = target.model, str(target.version)
    worker = f"{model}-v{version}"
    client = InferenceServerClient(url=f"127.0.0.1:{stack.config.ports.triton_grpc}")
    stats = _Statistics(client, triton_model, triton_version)
    series: dict[str, Series] = {}
    try:
        for batch in sorted({1, 8, max_batch}):
            before = await stats.snapshot()
            rows = direct_rows if batch > 1 else max(50, direct_rows // 8)
            summary = await direct_loop(client, spec, batch, rows, version)
            series[f"direct-{batch}"] = Series(
                summary, triton_times(before, await stats.snapshot(), triton_model, triton_version)
            )
        before = await stats.snapshot()
        summary, missing = await worker_burst(
            stack.config.bootstrap,
            spec,
            tasks,
            f"(b) worker from Kafka, max batch {max_batch}",
            version,
        )
        series["worker"] = Series(
            summary,
            triton_times(before, await stats.snapshot(), triton_model, triton_version),
            missing,
        )
        # (c): the stack's worker of the version steps aside; an unbatched one takes its consumer group.
        stack.services[worker].stop(grace_s=10)
        process, port = _start_unbatched_worker(stack, worker)
        try:
            wait_until("the unbatched worker to be ready", lambda: _ready(port), 60, 0.5)
            before = await stats.snapshot()
            summary, missing = await worker_burst(
                stack.config.bootstrap,
                spec,
                max(50, tasks // 4),
                "(c) worker from Kafka, max batch 1",
                version,
            )
            series["unbatched"] = Series(
                summary,
                triton_times(before, await stats.snapshot(), triton_model, triton_version),
                missing,
            )
        finally:
            process.stop(grace_s=10)
            stack.restart_service(worker)
    finally:
        await client.close()
    direct = series[f"direct-{max_batch}"].summary.per_second
    served = series["worker"].summary.per_second
    ratios: list[Ratio] = [
        ratio("(b) worker / (a) direct at max batch", served, direct, 0.8),
        ratio("(b) worker / (c) batching off", served, series["unbatched"].summary.per_second, 5),
    ]
    return {
        "model": f"{model} v{version} ({triton_model}, {backend_of(stack, triton_model)})",
        "series": {name: s.as_dict() for name, s in series.items()},
        "ratios": [r.as_dict() for r in ratios],
    }


def batching_markdown(report: dict[str, Any]) -> str:
    """The batching section: rows/s per series, Triton's times beside them, the ratios."""
    lines = [
        "| series | rows | rows/s | p50 ms | p99 ms | Triton requests | rows/exec "
        "| queue us/req | compute us/req | missing |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in report["series"].values():
        m, t = s["summary"], s["triton"]
        lines.append(
            f"| {m['name']} | {m['count']} | {m['per_second']:.1f} | {m['p50_ms']:.2f} "
            f"| {m['p99_ms']:.2f} | {t['requests']} | {t['rows_per_execution']:.1f} "
            f"| {t['queue_us']:.0f} | {t['compute_us']:.0f} | {s['missing']} |"
        )
    return (
        "\n".join(lines)
        + "\n\nLatency: (a) per gRPC call; (b), (c) per task, from its send in a burst "
        "to its result.\n\n" + ratios_markdown(report["ratios"])
    )


def batching_models_markdown(report: dict[str, Any]) -> str:
    """One batching section per model measured."""
    return "\n".join(
        f"### {model['model']}\n\n" + batching_markdown(model) for model in report["models"]
    )
