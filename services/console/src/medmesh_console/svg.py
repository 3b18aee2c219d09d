"""A rollout's timeline as an inline SVG step plot, drawn on the server (no script, no assets)."""

from __future__ import annotations

from html import escape

from medmesh_console.views import Timeline
from medmesh_contracts.lifecycle import LifecycleDecision, VersionFigures

WIDTH, HEIGHT = 720, 220
LEFT, RIGHT, TOP, BOTTOM = 48, 24, 16, 36
# Marker colours by action: what moved traffic forward, held, or took it back.
COLOURS = {
    "deploy": "#6a3d9a",
    "step": "#1f78b4",
    "promote": "#33a02c",
    "hold": "#ff7f00",
    "rollback": "#e31a1c",
    "readiness-lost": "#b15928",
}
DEFAULT_COLOUR = "#666666"


def figures_text(figures: VersionFigures) -> str:
    """One version's figures in words (the evidence a decision was judged on)."""
    parts = [
        f"v{figures.version}: {figures.requests} requests in {figures.window_s:g} s",
        f"error rate {figures.error_rate:.1%}",
    ]
    if figures.p99_ms is not None:
        parts.append(f"p99 {figures.p99_ms:.0f} ms")
    if figures.shadow_agreement is not None:
        parts.append(
            f"shadow agreement {figures.shadow_agreement:.1%} of {figures.shadow_compared}"
        )
    return ", ".join(parts)


def decision_text(decision: LifecycleDecision) -> str:
    """A decision in one line: when, what, why, and its figures."""
    figures = "; ".join(figures_text(f) for f in decision.figures)
    when = decision.decided_at.strftime("%Y-%m-%d %H:%M:%S")
    return f"{when} {decision.action}: {decision.reason}" + (f" [{figures}]" if figures else "")


def step_plot(timeline: Timeline) -> str:
    """The rolled-out version's share of traffic after each decision, as a step line with one
    numbered marker per decision (its tooltip says what was decided and on which figures)."""
    decisions = timeline.decisions
    start = decisions[0].decided_at.timestamp()
    span = max(decisions[-1].decided_at.timestamp() - start, 1.0)
    inner_w, inner_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def x(decision: LifecycleDecision) -> float:
        return LEFT + inner_w * (decision.decided_at.timestamp() - start) / span

    def y(weight: int) -> float:
        return TOP + inner_h * (1 - weight / 100)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="timeline" width="{WIDTH}"'
        f' height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" role="img"'
        f' aria-label="{escape(_label(timeline))}">'
    ]
    for weight in (0, 25, 50, 75, 100):
        parts.append(
            f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y(weight):.1f}" y2="{y(weight):.1f}"'
            ' stroke="#ddd"/>'
            f'<text x="{LEFT - 6}" y="{y(weight) + 4:.1f}" text-anchor="end"'
            f' font-size="11">{weight}%</text>'
        )
    points = [(x(d), y(timeline.weight_after(d))) for d in decisions]
    path = [f"M{points[0][0]:.1f},{points[0][1]:.1f}"]
    for px, py in points[1:]:
        path.append(f"H{px:.1f}V{py:.1f}")  # the share holds until the next decision
    path.append(f"H{WIDTH - RIGHT}")
    parts.append(f'<path d="{"".join(path)}" fill="none" stroke="#1f78b4" stroke-width="2"/>')
    for number, (decision, (px, py)) in enumerate(zip(decisions, points, strict=True), 1):
        colour = COLOURS.get(decision.action, DEFAULT_COLOUR)
        parts.append(
            f'<g class="decision"><circle cx="{px:.1f}" cy="{py:.1f}" r="5" fill="{colour}">'
            f"<title>{escape(decision_text(decision))}</title></circle>"
            f'<text x="{px:.1f}" y="{py - 8:.1f}" text-anchor="middle" font-size="10">'
            f"{number}</text></g>"
        )
    first = decisions[0].decided_at.strftime("%H:%M:%S")
    last = decisions[-1].decided_at.strftime("%H:%M:%S")
    parts.append(
        f'<text x="{LEFT}" y="{HEIGHT - 12}" font-size="11">{first}</text>'
        f'<text x="{WIDTH - RIGHT}" y="{HEIGHT - 12}" text-anchor="end"'
        f' font-size="11">{last} (UTC)</text></svg>'
    )
    return "".join(parts)


def _label(timeline: Timeline) -> str:
    version = f" v{timeline.version}" if timeline.version is not None else ""
    return f"share of traffic of {timeline.model}{version} after each decision"
