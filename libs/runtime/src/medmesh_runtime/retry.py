"""Plain retries, one rule for every stage: a few attempts, exponentially spaced (tenacity).

Used where one input's handling is retried before it is given up on (dead-lettered, rejected or
recorded as undeliverable). An error of a ``transient`` kind is raised at once instead: it is
nobody's input's fault, and the caller retries the whole poll from its committed offsets.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_not_exception_type,
    stop_after_attempt,
    wait_exponential,
)

Sleep = Callable[[float], Awaitable[None]]


def retrying(
    max_attempts: int,
    backoff_s: float,
    *,
    transient: tuple[type[BaseException], ...] = (),
    sleep: Sleep = asyncio.sleep,
    on_retry: Callable[[], None] | None = None,
) -> AsyncRetrying:
    """Up to ``max_attempts`` tries, ``backoff_s`` before the second and twice as long before
    each next; the last error is raised as it is (``reraise``). ``on_retry`` is called before
    each pause (for counters)."""

    def before_sleep(_state: RetryCallState) -> None:
        if on_retry is not None:
            on_retry()

    return AsyncRetrying(
        stop=stop_after_attempt(max_attempts),
        wait=wait_exponential(multiplier=backoff_s, min=backoff_s),
        retry=retry_if_not_exception_type(transient),
        reraise=True,
        sleep=sleep,
        before_sleep=before_sleep,
    )
