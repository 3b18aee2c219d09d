"""The console's HTML, rendered on the server: every value is escaped unless it is ``Html``
(markup this module or ``svg`` built from escaped parts). No script, no external asset."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from html import escape

from medmesh_cli.ops.dlq import DEAD_LETTER_TOPICS
from medmesh_console.svg import COLOURS, figures_text, step_plot
from medmesh_console.views import (
    AUDIT_DECISIONS_PER_PARTITION,
    DEAD_LETTERS_PER_PARTITION,
    DeadLetterCount,
    LagRow,
    ModelView,
    ReportRow,
    Timeline,
    VersionRow,
)


class Html(str):
    """Markup that is already safe: never escaped again."""

    __slots__ = ()


NAV = (
    ("/", "Models"),
    ("/rollouts", "Rollouts"),
    ("/lag", "Consumer lag"),
    ("/dead-letters", "Dead letters"),
    ("/reports", "Reports"),
)
STYLE = """
body{font-family:system-ui,sans-serif;margin:0;color:#222}
header{background:#1d3557;color:#fff;padding:.6em 1em}
header a{color:#fff;margin-right:1.2em;text-decoration:none}
header a.here{border-bottom:2px solid #fff}
main{padding:1em 1.5em}
table{border-collapse:collapse;margin:.5em 0 1.5em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#f1f3f5}
td.num{text-align:right}
.error{background:#fde2e1;border:1px solid #e31a1c;padding:.6em}
.muted{color:#666}
"""


def cell(value: object) -> str:
    """One value as HTML: ``Html`` as it is, None as a dash, anything else escaped."""
    if isinstance(value, Html):
        return value
    return "-" if value is None else escape(str(value))


def table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> Html:
    """A table whose every cell is escaped (``cell``)."""
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return Html(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")


def page(title: str, path: str, body: str) -> str:
    """A whole page: navigation, title and ``body`` (already HTML)."""
    links = "".join(
        f'<a href="{href}"{" class=here" if href == path else ""}>{escape(name)}</a>'
        for href, name in NAV
    )
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{escape(title)} - medmesh console</title><style>{STYLE}</style></head>"
        f"<body><header><strong>medmesh console</strong> &nbsp; {links}</header>"
        f"<main><h1>{escape(title)}</h1>{body}</main></body></html>"
    )


def error(what: str, problem: str) -> Html:
    """What could not be read and why (the page says so instead of showing nothing)."""
    return Html(f'<p class="error">Could not read {escape(what)}: {escape(problem)}</p>')


def _time(at: datetime) -> str:
    return at.strftime("%Y-%m-%d %H:%M:%S UTC")


def _percent(value: float | None) -> str | None:
    return None if value is None else f"{value:.1%}"


def _version_row(row: VersionRow) -> list[object]:
    f = row.figures
    return [
        f"v{row.version}",
        row.state,
        f"{row.weight}%",
        f"{row.effective_weight}%",
        {True: "yes", False: "no", None: None}[row.servable],
        row.live_workers,
        None if f is None else f.requests,
        None if f is None else _percent(f.error_rate),
        None if f is None or f.p99_ms is None else f"{f.p99_ms:.0f} ms",
        None if f is None else _percent(f.shadow_agreement),
    ]


def models_body(models: Sequence[ModelView]) -> Html:
    """Every model: its rollout and, per version, state, weights and the router's figures."""
    if not models:
        return Html('<p class="muted">The router knows no model yet.</p>')
    parts = []
    for model in models:
        rollout = model.phase
        if model.rollout_version is not None:
            steps = "/".join(f"{s}%" for s in model.steps)
            rollout += f" (v{model.rollout_version}, step {model.step + 1} of {steps})"
        if model.next_judgement_in_s is not None:
            rollout += f"; next judgement in {model.next_judgement_in_s:.0f} s"
        parts.append(
            f"<h2>{escape(model.name)}</h2><p>Revision {model.revision}, changed by"
            f" {escape(model.changed_by)} at {escape(_time(model.changed_at))}. Rollout:"
            f" {escape(rollout)}.</p>"
        )
        parts.append(
            table(
                [
                    "version",
                    "state",
                    "weight",
                    "effective weight",
                    "servable",
                    "live workers",
                    "requests",
                    "error rate",
                    "p99",
                    "shadow agreement",
                ],
                [_version_row(v) for v in model.versions],
            )
        )
    return Html("".join(parts))


def _weights(weights: dict[int, int]) -> str:
    return ", ".join(f"v{v} {w}%" for v, w in sorted(weights.items())) or "none"


def _legend() -> Html:
    return Html(
        '<p class="muted">Markers: '
        + ", ".join(
            f'<span style="color:{c}">&#9679;</span> {escape(a)}' for a, c in COLOURS.items()
        )
        + ". Hover a marker for the decision and its figures.</p>"
    )


def rollouts_body(found: Sequence[Timeline], unreadable: int) -> Html:
    """Each rollout: its share of traffic over time, and every decision with its figures."""
    parts: list[str] = [
        _legend(),
        f'<p class="muted">Drawn from the newest {AUDIT_DECISIONS_PER_PARTITION} decisions of'
        " medmesh.models.audit (<code>medmesh models history NAME --last N</code> reads further"
        " back): an older rollout may begin part-way.</p>",
    ]
    if unreadable:
        parts.append(f'<p class="error">{unreadable} audit records could not be read.</p>')
    if not found:
        parts.append('<p class="muted">No lifecycle decision in medmesh.models.audit yet.</p>')
    for timeline in found:
        version = f" v{timeline.version}" if timeline.version is not None else " (no rollout)"
        parts.append(
            f"<h2>{escape(timeline.model)}{escape(version)}: {escape(timeline.outcome)}</h2>"
        )
        # Plotted: a rolled-out version's share. Before any deploy there is no such version.
        if timeline.version is not None:
            parts.append(step_plot(timeline))
        rows = [
            [
                number,
                _time(d.decided_at),
                d.action,
                d.actor,
                f"{_weights(d.weights_before)} -> {_weights(d.weights_after)}",
                Html("<br>".join(escape(figures_text(f)) for f in d.figures)) or None,
                d.reason,
            ]
            for number, d in enumerate(timeline.decisions, 1)
        ]
        parts.append(
            table(["#", "time", "action", "by", "weights", "figures judged", "reason"], rows)
        )
    return Html("".join(parts))


def lag_body(rows: Sequence[LagRow]) -> Html:
    """Lag per consumer group and topic."""
    if not rows:
        return Html('<p class="muted">No medmesh consumer group has committed offsets yet.</p>')
    total = sum(r.lag or 0 for r in rows)
    return Html(
        f"<p>{total} messages not yet processed in all.</p>"
        + table(
            ["group", "topic", "lag (messages)"],
            [[r.group, r.topic or "(no committed offset yet)", r.lag] for r in rows],
        )
    )


def dead_letters_body(counts: Sequence[DeadLetterCount]) -> Html:
    """Dead letters per topic and reason, and what each topic holds."""
    per_topic = {
        topic: sum(c.count for c in counts if c.topic == topic) for topic in DEAD_LETTER_TOPICS
    }
    return Html(
        f'<p class="muted">Counted over the newest {DEAD_LETTERS_PER_PARTITION} entries of each'
        " partition (<code>medmesh dlq list</code> counts them all).</p>"
        + table(
            ["topic", "holds", "entries"],
            [[t, what, per_topic[t]] for t, what in DEAD_LETTER_TOPICS.items()],
        )
        + "<h2>By reason</h2>"
        + (
            table(["topic", "reason", "entries"], [[c.topic, c.reason, c.count] for c in counts])
            if counts
            else '<p class="muted">No dead letters.</p>'
        )
    )


def reports_body(rows: Sequence[ReportRow], unreadable: int, limit: int) -> Html:
    """The newest reports by pseudonym: model, version, band and time only."""
    note = (
        f'<p class="muted">The newest {limit} reports at most; pseudonyms only, no patient data.'
        + (f" {unreadable} records were not readable as reports." if unreadable else "")
        + "</p>"
    )
    if not rows:
        return Html(note + '<p class="muted">No reports yet.</p>')
    return Html(
        note
        + table(
            ["time", "pseudonym", "model", "version", "band or finding"],
            [[_time(r.at), r.pseudonym, r.model, r.version, r.band or None] for r in rows],
        )
    )


def unauthorized() -> str:
    """What a visitor without a valid token sees."""
    return page(
        "Sign in",
        "",
        "<p>This console needs a token: send <code>Authorization: Bearer &lt;token&gt;</code>,"
        " or open <code>/?token=&lt;token&gt;</code> once to keep it in a cookie.</p>",
    )
