"""Latency statistics for benchmarks (pure)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) by nearest rank of already sorted values."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


@dataclass(frozen=True)
class Summary:
    """Count, throughput and latency percentiles of one measured series."""

    name: str
    count: int
    seconds: float
    per_second: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


def summarize(name: str, latencies_ms: Sequence[float], seconds: float) -> Summary:
    """Summary of latencies measured over ``seconds`` of wall time."""
    ordered = sorted(latencies_ms)
    return Summary(
        name=name,
        count=len(ordered),
        seconds=seconds,
        per_second=len(ordered) / seconds if seconds > 0 else math.nan,
        p50_ms=percentile(ordered, 50),
        p90_ms=percentile(ordered, 90),
        p99_ms=percentile(ordered, 99),
        max_ms=ordered[-1] if ordered else math.nan,
    )


def markdown_table(rows: Sequence[Summary], baseline: str | None = None) -> str:
    """A Markdown table of summaries, with throughput as a ratio to ``baseline`` when given."""
    base = next((r for r in rows if r.name == baseline), None)
    header = "| series | n | per s | p50 ms | p90 ms | p99 ms | max ms |" + (
        f" vs {baseline} |" if base else ""
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in rows:
        ratio = f" {r.per_second / base.per_second:.2f} |" if base and base.per_second else ""
        lines.append(
            f"| {r.name} | {r.count} | {r.per_second:.1f} | {r.p50_ms:.2f} | {r.p90_ms:.2f} "
            f"| {r.p99_ms:.2f} | {r.max_ms:.2f} |{ratio}"
        )
    return "\n".join(lines) + "\n"
