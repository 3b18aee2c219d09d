"""What each model version did: requests, failures, latency and shadow agreement over a window.

Fed from medmesh.inference.results, medmesh.inference.failed and
medmesh.inference.shadow-results; read by the rollout controller and by ``GET /models``.
Latency is from the router's ``routed_at`` to the worker's ``completed_at`` (queueing included).
A shadow result is paired with the primary result of the same correlation id: they agree when
their headline outputs say the same (the same risk band, the same most probable class, the same
findings); the mean absolute difference of their headline values (scores) is reported beside.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TypeVar

from medmesh_contracts.events import InferenceCompleted, InferenceFailed
from medmesh_contracts.lifecycle import VersionFigures
from medmesh_contracts.modelspec import ModelSpec
from medmesh_contracts.results import OutputError, read_headline

MAX_SAMPLES = 100_000
MAX_PENDING = 20_000
V = TypeVar("V")


@dataclass(frozen=True)
class Sample:
    """One request a version finished (or failed) at ``at`` (epoch seconds)."""

    at: float
    latency_ms: float | None
    failed: bool


@dataclass(frozen=True)
class Comparison:
    """One mirrored request scored by both the primary and the shadow version."""

    at: float
    same_band: bool
    abs_diff: float | None


@dataclass(frozen=True)
class Output:
    """A version's headline for one correlation id: what it says, and its value if it has one."""

    version: int
    label: str
    value: float | None


# What a result's headline says, or None when it cannot be read.
Headline = Callable[[InferenceCompleted], Output | None]


def headlines(specs: Mapping[str, ModelSpec]) -> Headline:
    """Read a result's headline with its model version's spec (None: unknown or unreadable)."""

    def read(completed: InferenceCompleted) -> Output | None:
        spec = specs.get(completed.task.request.model)
        if spec is None:
            return None
        try:
            version = spec.version(completed.task.model_version)
            reading = read_headline(version, completed.outputs)
        except (KeyError, OutputError):
            return None
        return Output(version.version, reading.label, reading.value)

    return read


def percentile(values: list[float], fraction: float) -> float | None:
    """Nearest-rank percentile (``fraction`` in 0..1); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


class Analysis:
    """Per-version samples and shadow comparisons, bounded in memory."""

    def __init__(
        self,
        headline: Headline,
        mirrored: Callable[[str], bool] = lambda _model: True,
    ) -> None:
        self._headline = headline
        # Whether a model has a shadow version now: only then is a primary result kept until
        # its shadow's arrives (else 20,000 unpaired ones grew the router's memory in the soak).
        self._mirrored = mirrored
        self._samples: dict[tuple[str, int], deque[Sample]] = {}
        self._comparisons: dict[tuple[str, int], deque[Comparison]] = {}
        self._primary: OrderedDict[str, Output] = OrderedDict()
        self._shadow: OrderedDict[str, tuple[str, Output]] = OrderedDict()

    def _add(self, model: str, version: int, sample: Sample) -> None:
        key = (model, version)
        if key not in self._samples:
            self._samples[key] = deque(maxlen=MAX_SAMPLES)
        self._samples[key].append(sample)

    def completed(self, event: InferenceCompleted) -> None:
        """A result: a sample for its version; a shadow copy is paired with its primary."""
        task = event.task
        latency = (event.completed_at - task.routed_at).total_seconds() * 1000
        at = event.completed_at.timestamp()
        self._add(task.request.model, task.model_version, Sample(at, latency, failed=False))
        output = self._headline(event)
        if output is None:
            return
        if task.route.reason == "shadow":
            primary = self._primary.pop(event.correlation_id, None)
            if primary is None:
                _bounded_put(self._shadow, event.correlation_id, (task.request.model, output))
            else:
                self._compare(task.request.model, primary, output, at)
        else:
            pending = self._shadow.pop(event.correlation_id, None)
            if pending is None:
                if self._mirrored(task.request.model):
                    _bounded_put(self._primary, event.correlation_id, output)
            else:
                self._compare(pending[0], output, pending[1], at)

    def _compare(self, model: str, primary: Output, shadow: Output, at: float) -> None:
        key = (model, shadow.version)
        if key not in self._comparisons:
            self._comparisons[key] = deque(maxlen=MAX_SAMPLES)
        self._comparisons[key].append(
            Comparison(
                at,
                primary.label == shadow.label,
                None
                if primary.value is None or shadow.value is None
                else abs(primary.value - shadow.value),
            )
        )

    def failed(self, event: InferenceFailed) -> None:
        """A failure after retries counts against its version."""
        task = event.task
        at = event.occurred_at.timestamp()
        self._add(task.request.model, task.model_version, Sample(at, None, failed=True))

    def figures(self, model: str, version: int, since: datetime, now: datetime) -> VersionFigures:
        """What ``version`` did between ``since`` and ``now``."""
        start = since.timestamp()
        samples = [s for s in self._samples.get((model, version), ()) if s.at >= start]
        failures = sum(s.failed for s in samples)
        latencies = [s.latency_ms for s in samples if s.latency_ms is not None]
        compared = [c for c in self._comparisons.get((model, version), ()) if c.at >= start]
        diffs = [c.abs_diff for c in compared if c.abs_diff is not None]
        return VersionFigures(
            version=version,
            window_s=round(max(0.0, (now - since).total_seconds()), 3),
            requests=len(samples),
            failures=failures,
            error_rate=failures / len(samples) if samples else 0.0,
            p50_ms=percentile(latencies, 0.50),
            p99_ms=percentile(latencies, 0.99),
            shadow_compared=len(compared),
            shadow_agreement=(
                sum(c.same_band for c in compared) / len(compared) if compared else None
            ),
            shadow_mean_abs_diff=sum(diffs) / len(diffs) if diffs else None,
        )


def _bounded_put(pending: OrderedDict[str, V], key: str, value: V) -> None:
    pending[key] = value
    while len(pending) > MAX_PENDING:
        pending.popitem(last=False)
