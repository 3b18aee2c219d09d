"""A circuit breaker around one Triton model version, and the wait for the version to be ready at
start (``wait_until_ready``: a worker's, and the monolith's for each version). No I/O: the clock,
randomness, the readiness probe and the sleep are injected.

closed: tasks flow. open: the worker fetches nothing and waits for ``retry_at``. half-open: a
readiness probe succeeded, the worker fetches again, and the next batch is the trial; its success
closes the circuit, another failure opens it again with a longer wait. Waits grow exponentially
(``initial_s * 2**(failures - 1)``, capped at ``max_s``) with "equal jitter": half the wait is
fixed, half random, so many workers probing one restarted server do not arrive in lockstep.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal

from medmesh_runtime.logging import get_logger

log = get_logger("medmesh.inference.worker")

CircuitState = Literal["closed", "open", "half-open"]


@dataclass(frozen=True)
class CircuitBackoff:
    """How long an open circuit waits before its next readiness probe: exponential backoff with
    equal jitter."""

    initial_s: float = 0.2
    max_s: float = 5.0

    def ceiling(self, failures: int) -> float:
        """The longest wait after ``failures`` consecutive failures (1-based)."""
        return float(min(self.max_s, self.initial_s * 2.0 ** max(0, failures - 1)))

    def delay(self, failures: int, rand: Callable[[], float] = random.random) -> float:
        """A wait in ``[ceiling / 2, ceiling]`` after ``failures`` consecutive failures."""
        ceiling = self.ceiling(failures)
        return ceiling / 2 + rand() * ceiling / 2


@dataclass
class CircuitBreaker:
    """The state of the circuit; the worker asks it before fetching and tells it outcomes."""

    backoff: CircuitBackoff
    clock: Callable[[], float]
    rand: Callable[[], float] = random.random
    state: CircuitState = "closed"
    # Consecutive failures since the circuit was last closed.
    failures: int = 0
    retry_at: float = 0.0
    opened_total: int = field(default=0)

    @property
    def closed(self) -> bool:
        """Whether tasks flow freely."""
        return self.state == "closed"

    @property
    def fetching(self) -> bool:
        """Whether the worker may fetch tasks (closed, or half-open for the trial batch)."""
        return self.state != "open"

    def record_failure(self) -> float:
        """Triton is unreachable or not ready: open the circuit; returns the wait before a probe."""
        if self.state == "closed":
            self.opened_total += 1
        self.failures += 1
        self.state = "open"
        wait = self.backoff.delay(self.failures, self.rand)
        self.retry_at = self.clock() + wait
        return wait

    def probe_due(self) -> bool:
        """Whether the circuit is open and its wait is over (time for a readiness probe)."""
        return self.state == "open" and self.clock() >= self.retry_at

    def seconds_to_probe(self) -> float:
        """How long until the next probe is due (0 when due or not open)."""
        if self.state != "open":
            return 0.0
        return max(0.0, self.retry_at - self.clock())

    def probe_succeeded(self) -> None:
        """The readiness probe answered ready: let one trial batch through (half-open)."""
        if self.state == "open":
            self.state = "half-open"

    def record_success(self) -> None:
        """A batch was served: close the circuit and forget past failures."""
        self.state = "closed"
        self.failures = 0
        self.retry_at = 0.0


async def wait_until_ready(
    probe: Callable[[], Awaitable[bool]],
    breaker: CircuitBreaker,
    sleep: Callable[[float], Awaitable[None]],
    *,
    stopped: Callable[[], bool] = lambda: False,
    **about: object,
) -> bool:
    """Probe with the breaker's backoff until the version is ready (the circuit closed): True;
    False when ``stopped`` says so first. ``about`` names the version in the waits' log lines."""
    while not stopped():
        if await probe():
            breaker.record_success()
            return True
        wait = breaker.record_failure()
        log.info("waiting for the model version to be ready", retry_in_s=round(wait, 2), **about)
        await sleep(wait)
    return False
