"""Inference workers on the real Kafka broker and the real Triton server: batching, poison
requests, and a Triton restart under load.

Tasks are published straight to the deterioration v1 task topic (as the router would), so the
worker is what is measured; results and failures are read back from their topics.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
from aiokafka import AIOKafkaProducer

from medmesh_cli.devstack.stack import Stack
from medmesh_contracts import headers as h
from medmesh_contracts import topics
from medmesh_contracts.events import RunInference, schema_of, to_wire
from medmesh_contracts.modelspec import ModelSpec, load_specs
from medmesh_inference.tensors import Rows, input_batch, input_rows
from tests.e2e.conftest import Record, TopicTap
from tests.factories import make_inputs, make_request, make_task

TASKS_V1 = topics.model_task_topic("deterioration", 1)
WORKER_V1 = "deterioration-v1"
# heart rate 1e39 is a finite float64 that becomes +inf in the FP32 tensor: Triton rejects it.
POISON_HEART_RATE = 1e39


@pytest.fixture(scope="module")
async def worker_tap(stack: Stack) -> AsyncIterator[TopicTap]:
    """Reads results, failures and heartbeats for this module's tests."""
    reader = TopicTap(
        stack.config.bootstrap,
        (
            topics.INFERENCE_RESULTS,
            topics.INFERENCE_FAILED,
            topics.MODELS_STATUS,
            topics.REPORTS_DIAGNOSTIC,
        ),
    )
    await reader.start()
    yield reader
    await reader.stop()


@pytest.fixture(scope="module")
def spec(stack: Stack) -> ModelSpec:
    """The deterioration model spec the stack serves."""
    return load_specs(stack.config.specs_dir)["deterioration"]


def _vitals(rng: random.Random) -> dict[str, float]:
    return {
        "respiratory_rate": float(rng.randint(6, 32)),
        "spo2": float(rng.randint(84, 100)),
        "supplemental_oxygen": float(rng.random() < 0.2),
        "temperature": round(rng.uniform(34.5, 40.5), 1),
        "systolic_bp": float(rng.randint(75, 230)),
        "heart_rate": float(rng.randint(35, 150)),
        "not_alert": float(rng.random() < 0.1),
    }


def _task(run: str, i: int, values: dict[str, float]) -> RunInference:
    request = make_request(
        correlation_id=f"{run}-{i:04d}",
        subject_reference=f"Patient/{run}-{i:04d}",
        patient_pseudonym=f"pseudo-{run}-{i % 50}",
    ).model_copy(update={"inputs": make_inputs(values)})
    return make_task(request=request)


async def _publish(producer: AIOKafkaProducer, tasks: list[RunInference]) -> None:
    """Publish all tasks without waiting for each one, then wait for every acknowledgement."""
    sends = [
        await producer.send(
            TASKS_V1,
            to_wire(t),
            key=t.request.patient_pseudonym.encode(),
            headers=[
                (h.CORRELATION_ID, t.correlation_id.encode()),
                (h.SCHEMA, schema_of(RunInference).encode()),
            ],
        )
        for t in tasks
    ]
    await asyncio.gather(*sends)


def _correlation(record: Record) -> str:
    return str(record.json()["correlation_id"])


def _of_run(tap: TopicTap, topic: str, run: str) -> list[Record]:
    return tap.matching(topic, lambda r: _correlation(r).startswith(f"{run}-"))


async def _wait_for_outcomes(
    tap: TopicTap, run: str, expected: int, timeout_s: float
) -> tuple[list[Record], list[Record]]:
    deadline = time.monotonic() + timeout_s
    while True:
        results = _of_run(tap, topics.INFERENCE_RESULTS, run)
        failed = _of_run(tap, topics.INFERENCE_FAILED, run)
        if len({_correlation(r) for r in results + failed}) >= expected:
            await asyncio.sleep(1.0)  # time for a duplicate to show up, were there one
            return (
                _of_run(tap, topics.INFERENCE_RESULTS, run),
                _of_run(tap, topics.INFERENCE_FAILED, run),
            )
        if time.monotonic() > deadline:
            pytest.fail(
                f"{len(results)} results and {len(failed)} failures of {expected} after {timeout_s}s"
            )
        await asyncio.sleep(0.1)


def _model_stats(stack: Stack) -> dict[str, int]:
    """Triton's cumulative counters for deterioration version 1 (statistics endpoint)."""
    client = triton_grpc.InferenceServerClient(stack.triton.grpc_url)
    try:
        stats = client.get_inference_statistics("deterioration", "1", as_json=True)
    finally:
        client.close()
    model = stats["model_stats"][0]
    return {
        "requests": int(model["inference_stats"]["success"].get("count", 0)),
        "rows": int(model.get("inference_count", 0)),
        "executions": int(model.get("execution_count", 0)),
    }


def _one_by_one(
    stack: Stack, spec: ModelSpec, rows: list[Rows]
) -> list[dict[str, tuple[float, ...]]]:
    """Each row scored in its own Triton call, as the reference for batched results."""
    client = triton_grpc.InferenceServerClient(stack.triton.grpc_url)
    names = ("SCORE", "RISK_BAND", "CONTRIBUTIONS")
    try:
        answers = []
        for row in rows:
            tensor = triton_grpc.InferInput("VITALS", [1, len(row["VITALS"])], "FP32")
            tensor.set_data_from_numpy(input_batch(spec.version(1), [row])["VITALS"])
            result = client.infer(
                "deterioration",
                [tensor],
                model_version="1",
                outputs=[triton_grpc.InferRequestedOutput(n) for n in names],
            )
            answers.append(
                {
                    n: tuple(float(x) for x in np.asarray(result.as_numpy(n)).reshape(-1))
                    for n in names
                }
            )
        return answers
    finally:
        client.close()


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (from /proc)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return ticks / os.sysconf("SC_CLK_TCK")


async def test_500_tasks_published_at_once_take_far_fewer_triton_calls(
    stack: Stack, worker_tap: TopicTap, producer: AIOKafkaProducer, spec: ModelSpec
) -> None:
    """500 tasks at once are served in far fewer Triton calls, with one-by-one-identical results."""
    run = f"batch-{uuid.uuid4().hex[:8]}"
    rng = random.Random(500)  # noqa: S311 -- reproducible test data
    tasks = [_task(run, i, _vitals(rng)) for i in range(500)]
    before = _model_stats(stack)
    await _publish(producer, tasks)
    results, failed = await _wait_for_outcomes(worker_tap, run, 500, timeout_s=45)
    after = _model_stats(stack)
    calls = after["requests"] - before["requests"]
    rows = after["rows"] - before["rows"]
    executions = after["executions"] - before["executions"]
    print(  # noqa: T201 -- the measured figures, shown with pytest -s
        f"\n500 tasks: {calls} Triton requests, {executions} model executions, {rows} rows"
    )
    assert failed == []
    assert len(results) == 500
    assert rows == 500
    assert calls <= 50, f"{calls} Triton requests for 500 tasks"
    sizes = [r.json()["batch_size"] for r in results]
    assert max(sizes) > 1
    by_id = {_correlation(r): r.json()["outputs"] for r in results}
    reference = _one_by_one(stack, spec, [input_rows(t, spec, spec.version(1)) for t in tasks])
    for task, expected in zip(tasks, reference, strict=True):
        got = {k: tuple(v) for k, v in by_id[task.correlation_id].items()}
        assert got == expected, task.correlation_id


async def test_a_poison_task_among_good_ones_alone_goes_to_the_failed_topic(
    stack: Stack, worker_tap: TopicTap, producer: AIOKafkaProducer
) -> None:
    """One task whose heart rate no FP32 tensor holds (1e39) fails alone with the reason, before
    any Triton call; its 20 batch neighbours get results. (Triton's own rejection of a row, and
    the batch split around it, are unit-tested in tests/unit/test_batching.py.)"""
    run = f"poison-{uuid.uuid4().hex[:8]}"
    rng = random.Random(21)  # noqa: S311 -- reproducible test data
    tasks = [_task(run, i, _vitals(rng)) for i in range(21)]
    poison_values = {**_vitals(rng), "heart_rate": POISON_HEART_RATE}
    tasks[10] = _task(run, 10, poison_values)
    await _publish(producer, tasks)
    results, failed = await _wait_for_outcomes(worker_tap, run, 21, timeout_s=30)
    assert [_correlation(r) for r in failed] == [tasks[10].correlation_id]
    event = failed[0].json()
    assert event["error_kind"] == "invalid-input"
    assert "beyond the FP32 range" in event["reason"]
    assert sorted(_correlation(r) for r in results) == sorted(
        t.correlation_id for i, t in enumerate(tasks) if i != 10
    )
    assert all(p.running() for p in stack.services.values())


async def test_triton_restart_mid_stream_loses_nothing_and_duplicates_nothing(
    stack: Stack, worker_tap: TopicTap, producer: AIOKafkaProducer
) -> None:
    """Tasks sent before, during and after a Triton restart each get exactly one result."""
    run = f"restart-{uuid.uuid4().hex[:8]}"
    rng = random.Random(7)  # noqa: S311 -- reproducible test data
    tasks = [_task(run, i, _vitals(rng)) for i in range(120)]
    worker = stack.services[WORKER_V1]
    assert worker.pid is not None
    started = time.monotonic()
    await _publish(producer, tasks[:40])
    restart = asyncio.create_task(asyncio.to_thread(stack.restart_triton, 3.0))
    await asyncio.sleep(0.3)
    cpu_before, down_at = _cpu_seconds(worker.pid), time.monotonic()
    for chunk in range(40, 80, 5):  # a trickle while Triton is down or starting
        await _publish(producer, tasks[chunk : chunk + 5])
        await asyncio.sleep(0.3)
    await restart
    cpu_used, down_wall = _cpu_seconds(worker.pid) - cpu_before, time.monotonic() - down_at
    await _publish(producer, tasks[80:])
    results, failed = await _wait_for_outcomes(worker_tap, run, 120, timeout_s=45)
    ids = [_correlation(r) for r in results]
    print(  # noqa: T201 -- the measured figures, shown with pytest -s
        f"\nTriton restart: down/starting {down_wall:.1f}s, worker CPU {cpu_used:.2f}s, "
        f"all 120 results {time.monotonic() - started:.1f}s after the first task"
    )
    assert failed == []
    assert sorted(ids) == sorted(t.correlation_id for t in tasks)
    assert len(ids) == len(set(ids)), "a task got two results"
    assert worker.running()
    assert cpu_used < 0.3 * down_wall, f"the worker used {cpu_used:.2f}s CPU in {down_wall:.1f}s"
    subjects = await _report_subjects(worker_tap, run, 120)
    assert sorted(subjects) == sorted(t.request.subject_reference for t in tasks)
    beats = await _heartbeats_until_ready_again(worker_tap, f"{WORKER_V1}-1")
    assert any(not b["triton_ready"] for b in beats)
    assert any(b["circuit"] != "closed" and b["state"] == "degraded" for b in beats)


def _subject(report: Record) -> str:
    bundle = report.json()
    for entry in bundle.get("entry", []):
        if entry["resource"]["resourceType"] == "DiagnosticReport":
            return str(entry["resource"]["subject"]["reference"])
    return ""


async def _report_subjects(tap: TopicTap, run: str, expected: int) -> list[str]:
    """Subjects of the run's reports, once every one arrived (and a moment for duplicates)."""
    deadline = time.monotonic() + 30
    while True:
        subjects = [
            s
            for s in map(_subject, tap.records.get(topics.REPORTS_DIAGNOSTIC, []))
            if s.startswith(f"Patient/{run}-")
        ]
        if len(set(subjects)) >= expected:
            await asyncio.sleep(1.0)
            return [
                s
                for s in map(_subject, tap.records.get(topics.REPORTS_DIAGNOSTIC, []))
                if s.startswith(f"Patient/{run}-")
            ]
        if time.monotonic() > deadline:
            pytest.fail(f"{len(set(subjects))} of {expected} reports after 30s")
        await asyncio.sleep(0.2)


async def _heartbeats_until_ready_again(tap: TopicTap, instance: str) -> list[dict[str, Any]]:
    """The instance's heartbeats, once one says ready after one that said not ready."""
    deadline = time.monotonic() + 15
    while True:
        beats = [
            r.json()
            for r in tap.matching(topics.MODELS_STATUS, lambda r: r.key == instance.encode())
        ]
        down = [i for i, b in enumerate(beats) if not b["triton_ready"]]
        if down and any(
            b["state"] == "ready" and b["circuit"] == "closed" for b in beats[down[-1] + 1 :]
        ):
            return beats
        if time.monotonic() > deadline:
            pytest.fail(f"no heartbeat of {instance} said ready again: {beats[-3:]}")
        await asyncio.sleep(0.2)
