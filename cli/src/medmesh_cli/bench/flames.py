"""What a py-spy flame graph shows, in numbers: the frames with the most self time, and the
share of samples under a few cost families (logging, spans, pydantic, FHIR models, socket writes).

py-spy's SVG gives each frame as ``<title>name (file:line) (N samples, P%)</title>`` over a
``<rect y=... fg:x=... fg:w=...>``: a frame's children are the frames one row deeper within its
x-span, so self samples = its width less its children's.
"""

from __future__ import annotations

import html
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

_FRAME = re.compile(
    r"<title>(?P<name>.*?) \(\d+ samples?, [\d.]+%\)</title>"
    r"<rect [^>]*?y=\"(?P<y>\d+)\"[^>]*?fg:x=\"(?P<x>\d+)\" fg:w=\"(?P<w>\d+)\""
)
# Cost families by a pattern of the frame's name (function and file). They overlap (FHIR's
# models are pydantic models; aiokafka writes through the asyncio transport): each is a share
# of all samples on its own.
FAMILIES: Mapping[str, str] = {
    "event loop waiting (epoll)": r"EpollSelector\.select",
    "logging (stdlib handlers, structlog)": r"logging/__init__|structlog/",
    "OpenTelemetry (spans, export, metrics)": r"opentelemetry/|medmesh_runtime/telemetry",
    "FHIR models (fhir.resources, fhir_core)": r"fhir_core/|fhir/resources|fhir\.resources",
    "pydantic (FHIR's models included)": r"pydantic/|pydantic_core",
    "socket writes (asyncio transport)": r"_SelectorSocketTransport\.write",
    "aiokafka (client, records)": r"aiokafka/",
}


@dataclass(frozen=True)
class Frame:
    """One box of the flame graph."""

    name: str
    depth: int
    x: int
    width: int


def frames(svg: str) -> list[Frame]:
    """The frames of a py-spy flame graph."""
    return [
        Frame(html.unescape(m["name"]), int(m["y"]), int(m["x"]), int(m["w"]))
        for m in _FRAME.finditer(svg)
    ]


def _rows(found: Iterable[Frame]) -> tuple[dict[int, list[Frame]], int]:
    rows: dict[int, list[Frame]] = defaultdict(list)
    for frame in found:
        rows[frame.depth].append(frame)
    depths = sorted(rows)
    step = depths[1] - depths[0] if len(depths) > 1 else 1
    return rows, step


def total_samples(found: list[Frame]) -> int:
    """Samples in the graph (the width of its shallowest row)."""
    rows, _ = _rows(found)
    return sum(f.width for f in rows[min(rows)]) if rows else 0


def self_samples(found: list[Frame]) -> dict[str, int]:
    """Samples spent in each function itself (not in what it called), by frame name."""
    rows, step = _rows(found)
    selfs: dict[str, int] = defaultdict(int)
    for frame in found:
        children = sum(
            c.width
            for c in rows.get(frame.depth + step, [])
            if frame.x <= c.x < frame.x + frame.width
        )
        selfs[frame.name] += frame.width - children
    return dict(selfs)


def family_samples(found: list[Frame], pattern: str) -> int:
    """Samples under frames matching ``pattern``, each sample counted once (a match nested
    in another match is not added again)."""
    regex = re.compile(pattern)
    matching = sorted((f for f in found if regex.search(f.name)), key=lambda f: f.depth)
    counted: list[Frame] = []
    total = 0
    for frame in matching:
        if any(c.x <= frame.x < c.x + c.width and c.depth < frame.depth for c in counted):
            continue
        counted.append(frame)
        total += frame.width
    return total


def summary(svg_path: Path, top: int = 6) -> dict[str, object]:
    """The graph's samples, its top self-time frames and its cost families (shares)."""
    found = frames(svg_path.read_text(errors="replace"))
    total = total_samples(found)
    if not total:
        return {"samples": 0, "top_self": [], "families": {}}
    ranked = sorted(self_samples(found).items(), key=lambda kv: -kv[1])[:top]
    return {
        "samples": total,
        "top_self": [{"frame": name, "share": n / total} for name, n in ranked],
        "families": {
            family: family_samples(found, pattern) / total for family, pattern in FAMILIES.items()
        },
    }


def flames_markdown(summaries: Mapping[str, Mapping[str, object]]) -> str:
    """One row per profiled process: its samples, cost families and top self-time frames."""
    lines = [
        "| process | samples | " + " | ".join(FAMILIES) + " | top self time |",
        "|---|---|" + "---|" * len(FAMILIES) + "---|",
    ]
    for name, found in summaries.items():
        families = found["families"]
        top = found["top_self"]
        assert isinstance(families, dict)  # noqa: S101 -- summary()'s shape, for mypy
        assert isinstance(top, list)  # noqa: S101 -- summary()'s shape, for mypy
        shares = " | ".join(f"{families.get(f, 0.0):.0%}" for f in FAMILIES)
        frames_text = "; ".join(f"{t['frame']} {t['share']:.0%}" for t in top[:3])
        lines.append(f"| {name} | {found['samples']} | {shares} | {frames_text} |")
    return "\n".join(lines) + "\n"
