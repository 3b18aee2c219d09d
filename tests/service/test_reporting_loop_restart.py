"""The reporting loop survives a CancelledError raised inside its Kafka clients (found by
tests/chaos: after a Kafka restart the loop task ended silently, the process stayed up and
never reported again); cancelling the loop itself still stops it."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from medmesh_contracts import topics
from medmesh_contracts.events import to_wire
from medmesh_runtime.transactional import StageClients
from tests.factories import make_completed, make_request, make_task
from tests.service.test_reporting_app import _loop
from tests.transactional_kafka import FakeConsumer, FakeKafka, FakeProducer


@dataclass
class StrayCancelKafka(FakeKafka):
    """Clients that raise CancelledError (as aiokafka internals may) a given number of times."""

    stops_cancelled: int = 0  # consumer.stop() raises it
    starts_cancelled: int = 0  # producer.start() raises it

    def clients(self, group: str) -> StageClients:
        """A consumer and producers that raise CancelledError while the counters last."""
        kafka = self

        class Consumer(FakeConsumer):
            async def stop(self) -> None:
                if kafka.stops_cancelled > 0:
                    kafka.stops_cancelled -= 1
                    raise asyncio.CancelledError

        class Producer(FakeProducer):
            async def start(self) -> None:
                if kafka.starts_cancelled > 0:
                    kafka.starts_cancelled -= 1
                    raise asyncio.CancelledError
                await super().start()

        return StageClients(lambda: Consumer(self, group), lambda tid: Producer(self, tid))


async def _reports_one_result(kafka: StrayCancelKafka) -> list[bytes]:
    """Run the loop over one result until its report is committed (5 s at most)."""
    request = make_request(correlation_id="req-0")
    kafka.append(topics.INFERENCE_RESULTS, to_wire(make_completed(make_task(request))))
    task = asyncio.create_task(_loop(kafka).run())
    try:
        async with asyncio.timeout(5):
            while not kafka.values(topics.REPORTS_DIAGNOSTIC):
                assert not task.done(), "the loop ended"
                await asyncio.sleep(0.01)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    return kafka.values(topics.REPORTS_DIAGNOSTIC)


async def test_cancelled_error_from_a_client_stop_does_not_end_the_loop() -> None:
    """A send fails, stopping the consumer raises CancelledError: the loop starts over anyway."""
    kafka = StrayCancelKafka(fail_sends=1, stops_cancelled=1)
    assert len(await _reports_one_result(kafka)) == 1
    assert kafka.stops_cancelled == 0


async def test_cancelled_error_from_a_client_start_does_not_end_the_loop() -> None:
    """Starting the producer raises CancelledError: the loop starts over and reports."""
    kafka = StrayCancelKafka(starts_cancelled=2)
    assert len(await _reports_one_result(kafka)) == 1
    assert kafka.starts_cancelled == 0


async def test_cancelling_the_loop_still_stops_it() -> None:
    """Cancelling the loop's task (the service stops) ends it, even when a client stop raises."""
    kafka = StrayCancelKafka(stops_cancelled=5)
    task = asyncio.create_task(_loop(kafka).run())
    await asyncio.sleep(0.05)
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=5)
    assert task in done
    assert task.cancelled()
