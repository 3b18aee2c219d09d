"""PNG plots of the topology series (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib as mpl

mpl.use("Agg")  # before pyplot is imported: no display on the benchmark box

import matplotlib.pyplot as plt
from matplotlib.patches import Rectangle

COLOURS = {"services": "tab:blue", "monolith": "tab:orange"}
HOP_COLOURS = ("tab:red", "tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:olive")


def latency_plot(report: dict[str, Any], path: Path, note: str) -> Path:
    """End-to-end p50 and p99 against offered load, one line pair per topology (log y)."""
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for name, data in report["topologies"].items():
        levels = sorted(data["levels"], key=lambda lv: lv["offered_per_s"])
        offered = [lv["offered_per_s"] for lv in levels]
        colour = COLOURS.get(name)
        for key, style in (("p50_ms", "--"), ("p99_ms", "-")):
            axes.plot(
                offered,
                [lv["end_to_end"][key] for lv in levels],
                style,
                marker="o",
                color=colour,
                label=f"{name} {key.removesuffix('_ms')}",
            )
        if data["capacity_per_s"]:
            axes.axvline(data["capacity_per_s"], color=colour, alpha=0.3, linewidth=4)
    axes.set_yscale("log")
    axes.set_xlabel("offered load (events/s, open loop)")
    axes.set_ylabel("end-to-end latency (ms, from planned send)")
    axes.set_title(f"medmesh: services vs monolith ({note})", fontsize=9)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def hops_plot(report: dict[str, Any], path: Path, note: str) -> Path:
    """Per topology at half capacity: the median in-pipeline time split into the median wait
    of each hop (one Kafka topic traversal in the services; hatched, an in-process queue in the
    monolith) and the rest (the stages' work); medians over the ABBA phases."""
    figure, axes = plt.subplots(figsize=(8, 3.4))
    names = list(report["topologies"])
    colours: dict[str, Any] = {}
    palette = iter(HOP_COLOURS)
    for row, name in enumerate(names):
        half = report["topologies"][name]["half_capacity"]
        left = 0.0
        for hop in half["hops"]:
            topic = hop["hop"].removeprefix("in-process:")
            if topic not in colours:
                colours[topic] = next(palette, "tab:gray")
            wait = hop["wait_p50_ms"]["median"]
            axes.barh(
                row,
                wait,
                left=left,
                color=colours[topic],
                hatch="//" if hop["hop"] != topic else None,
                edgecolor="white",
            )
            left += wait
        rest = max(0.0, half["in_pipeline_p50_ms"]["median"] - left)
        axes.barh(row, rest, left=left, color="lightgrey", edgecolor="white")
    handles = [
        Rectangle((0, 0), 1, 1, color=c, label=f"wait: {topic}") for topic, c in colours.items()
    ]
    handles.append(Rectangle((0, 0), 1, 1, color="lightgrey", label="stage work (rest)"))
    axes.legend(handles=handles, fontsize=7, loc="lower right")
    labels = [
        f"{n}\n@ {report['topologies'][n]['half_capacity']['offered_per_s']:g}/s" for n in names
    ]
    axes.set_yticks(range(len(names)), labels)
    axes.set_xlabel("median ms: HTTP receipt -> report publish (hop waits, then the rest)")
    axes.set_title(f"per-hop breakdown at half capacity ({note})", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
