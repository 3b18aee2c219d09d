"""The wait for a model version to be ready at start (medmesh_inference.circuit.wait_until_ready),
shared by the workers and the monolith."""

from __future__ import annotations

from medmesh_inference.circuit import CircuitBackoff, CircuitBreaker, wait_until_ready


class Clock:
    """Monotonic time that moves only when slept."""

    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    async def sleep(self, seconds: float) -> None:
        """Advance the clock instead of waiting."""
        self.slept.append(seconds)
        self.now += seconds


async def test_probes_with_the_breakers_backoff_until_ready() -> None:
    """Two failed probes wait the breaker's growing delays; the third closes the circuit."""
    clock = Clock()
    breaker = CircuitBreaker(CircuitBackoff(0.2, 5.0), lambda: clock.now, rand=lambda: 1.0)
    answers = iter([False, False, True])

    async def probe() -> bool:
        return next(answers)

    assert await wait_until_ready(probe, breaker, clock.sleep, model="m", version=1)
    assert clock.slept == [0.2, 0.4]
    assert breaker.closed
    assert breaker.failures == 0


async def test_a_stopped_wait_returns_false_without_probing_on() -> None:
    """Once ``stopped`` says so, no further probe is made and the wait reports not ready."""
    clock = Clock()
    breaker = CircuitBreaker(CircuitBackoff(0.2, 5.0), lambda: clock.now)
    probes = []

    async def probe() -> bool:
        probes.append(clock.now)
        return False

    ready = await wait_until_ready(probe, breaker, clock.sleep, stopped=lambda: len(probes) >= 2)

    assert not ready
    assert len(probes) == 2
    assert breaker.state == "open"
