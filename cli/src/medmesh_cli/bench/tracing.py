"""Issue 7: whole-pipeline throughput with tracing at 100%, 10% parent-based, and off.

Every service is restarted with MEDMESH_TRACE_SAMPLE_RATIO set for each series (the stack's
span file exporter stays on), then the same open-loop HTTP load is offered above what the box
sustains, so the reports per second are the pipeline's throughput. Targets: 100% keeps >= 75%
of the untraced throughput, 10% keeps >= 90%.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from medmesh_cli.bench.common import Ratio, ratio, ratios_markdown
from medmesh_cli.bench.pipeline import run_load
from medmesh_cli.bench.stats import Summary, markdown_table
from medmesh_cli.devstack.stack import Stack, service_specs

RATIO_ENV = "MEDMESH_TRACE_SAMPLE_RATIO"
SAMPLINGS = (("100%", "1.0"), ("10% parent-based", "0.1"), ("off", "0"))


async def _restart_all(stack: Stack, sample_ratio: str) -> None:
    stack.config.extra_env[RATIO_ENV] = sample_ratio
    for service in service_specs(stack.config):
        await asyncio.to_thread(stack.restart_service, service.name)


async def run_tracing(
    stack: Stack, events_for: Callable[[str], list[bytes]], rate_per_s: float
) -> dict[str, Any]:
    """The same load shape at each sampling, over fresh patients each time (ingest answers a
    repeated event 200 'already sent' and scores nothing); the stack is left with sampling off."""
    rows: dict[str, Summary] = {}
    missing: dict[str, int] = {}
    refused: dict[str, int] = {}
    try:
        for label, sample_ratio in SAMPLINGS:
            await _restart_all(stack, sample_ratio)
            await asyncio.sleep(3)  # heartbeats and readiness settle before the load
            result = await run_load(
                stack.config.ingest_url, stack.config.bootstrap, events_for(label), rate_per_s
            )
            rows[label] = Summary(
                **{**result.end_to_end.as_dict(), "name": f"tracing {label} @ {rate_per_s:g}/s"}
            )
            missing[label] = result.missing
            refused[label] = result.non_2xx
    finally:
        stack.config.extra_env.pop(RATIO_ENV, None)
    off = rows["off"].per_second
    ratios: list[Ratio] = [
        ratio("100% / off", rows["100%"].per_second, off, 0.75),
        ratio("10% parent-based / off", rows["10% parent-based"].per_second, off, 0.9),
    ]
    return {
        "offered_per_s": rate_per_s,
        "series": [r.as_dict() for r in rows.values()],
        "missing": missing,
        "non_2xx": refused,
        "ratios": [r.as_dict() for r in ratios],
    }


def tracing_markdown(report: dict[str, Any]) -> str:
    """The tracing section."""
    rows = [Summary(**s) for s in report["series"]]
    return (
        markdown_table(rows, baseline=rows[-1].name)
        + f"\nMissing reports: {report['missing']}; answers other than 2xx: "
        + f"{report.get('non_2xx', {})}.\n\n"
        + ratios_markdown(report["ratios"])
    )
