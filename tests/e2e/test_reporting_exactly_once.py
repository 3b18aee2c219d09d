"""Exactly-once reports on the real broker: kill -9 the reporting service while results flow.

Results are published straight to medmesh.inference.results (tests/factories), so only reporting
is under test; each has its own correlation id and patient pseudonym (spread over partitions).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from collections import Counter

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from medmesh_cli.devstack.stack import Stack
from medmesh_contracts import headers as h
from medmesh_contracts import topics
from medmesh_contracts.events import to_wire
from tests.conformance.report_checks import check_report_bundle
from tests.factories import make_completed, make_request, make_task

RESULTS = 1000
KILLS = 5


def _results(run: str) -> list[tuple[bytes, bytes]]:
    """(key, value) of RESULTS distinct completed inferences, tagged with this run's id."""
    out = []
    for i in range(RESULTS):
        request = make_request(
            correlation_id=f"{run}-{i:04d}", patient_pseudonym=f"pseudo-{run}-{i % 97}"
        )
        completed = make_completed(make_task(request))
        out.append((request.patient_pseudonym.encode(), to_wire(completed)))
    return out


async def _publish_paced(producer: AIOKafkaProducer, records: list[tuple[bytes, bytes]]) -> None:
    """Publish in chunks of 50 every 0.75 s (about 15 s for 1,000), so kills land mid-flow."""
    for start in range(0, len(records), 50):
        sends = [
            await producer.send(topics.INFERENCE_RESULTS, value, key=key)
            for key, value in records[start : start + 50]
        ]
        await asyncio.gather(*sends)
        await asyncio.sleep(0.75)


async def _kill_and_restart(stack: Stack, rng: random.Random) -> list[float]:
    """kill -9 reporting KILLS times at random moments, restarting it after each; the delays."""
    delays = []
    for _ in range(KILLS):
        delay = rng.uniform(0.3, 2.5)
        delays.append(round(delay, 2))
        await asyncio.sleep(delay)
        stack.kill_service("reporting")
        await asyncio.to_thread(stack.restart_service, "reporting")
    return delays


async def _read_reports(
    bootstrap: str, run: str, isolation: str, until: int, timeout_s: float
) -> list[tuple[str, bytes]]:
    """This run's records on the reports topic, read from the beginning with ``isolation``."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, isolation_level=isolation
    )
    await consumer.start()
    try:
        partitions = [
            TopicPartition(topics.REPORTS_DIAGNOSTIC, p)
            for p in sorted(consumer.partitions_for_topic(topics.REPORTS_DIAGNOSTIC) or {0, 1})
        ]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        found: list[tuple[str, bytes]] = []
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=500, max_records=2000)
            for records in batch.values():
                for record in records:
                    cid = dict(record.headers).get(h.CORRELATION_ID, b"").decode()
                    if cid.startswith(run):
                        found.append((cid, record.value or b""))
            if not batch and len(found) >= until:
                break
        return found
    finally:
        await consumer.stop()


async def test_kill_9_five_times_while_results_flow_gives_exactly_one_report_each(
    stack: Stack,
) -> None:
    """1,000 results and five kill -9 of reporting: read_committed sees exactly one report each."""
    run = f"eos-{uuid.uuid4().hex[:8]}"
    rng = random.Random(run)  # noqa: S311 -- random kill moments, not security
    producer = AIOKafkaProducer(
        bootstrap_servers=stack.config.bootstrap, acks="all", enable_idempotence=True
    )
    await producer.start()
    started = time.monotonic()
    try:
        publishing = asyncio.create_task(_publish_paced(producer, _results(run)))
        delays = await _kill_and_restart(stack, rng)
        await publishing
    finally:
        await producer.stop()
    reports = await _read_reports(
        stack.config.bootstrap, run, "read_committed", until=RESULTS, timeout_s=60
    )
    elapsed = time.monotonic() - started
    raw = await _read_reports(stack.config.bootstrap, run, "read_uncommitted", RESULTS, 5)

    counts = Counter(cid for cid, _ in reports)
    print(  # noqa: T201 -- the measured figures of this run, shown with pytest -s
        f"\nexactly-once: {len(reports)} committed reports for {RESULTS} results,"
        f" {len(raw) - len(reports)} more records only in aborted transactions,"
        f" kills after {delays} s, {elapsed:.1f} s in all"
    )
    assert len(counts) == RESULTS
    assert set(counts.values()) == {1}
    assert len(reports) == RESULTS
    problems = [p for _, value in reports for p in check_report_bundle(json.loads(value))]
    assert problems == []
    assert stack.services["reporting"].running()
