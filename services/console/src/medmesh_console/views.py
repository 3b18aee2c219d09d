"""What each page shows, computed from what was read (pure functions: no I/O).

Reports are cut down to pseudonym, model, version, band and time here, before any page sees them:
a report's subject reference, names and values never leave this module.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from medmesh_cli.ops.dlq import summary
from medmesh_cli.reports import summarize
from medmesh_contracts.lifecycle import LifecycleDecision, ModelDeployment, VersionFigures

# --- models ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VersionRow:
    """One version of a model: its registry state and weight, and what the router measured."""

    version: int
    state: str
    weight: int
    effective_weight: int
    servable: bool | None
    live_workers: int | None
    figures: VersionFigures | None


@dataclass(frozen=True)
class ModelView:
    """One model as the router sees it now."""

    name: str
    revision: int
    phase: str
    rollout_version: int | None
    step: int
    steps: tuple[int, ...]
    next_judgement_in_s: float | None
    changed_by: str
    changed_at: datetime
    versions: tuple[VersionRow, ...]


def models_view(status: Mapping[str, Any]) -> tuple[ModelView, ...]:
    """The router's ``GET /models`` answer as one view per model, by name.

    Raises ValueError (pydantic's ValidationError is one) when a record is not a deployment."""
    views = []
    for name, entry in sorted(status.get("models", {}).items()):
        deployment = ModelDeployment.model_validate(entry["deployment"])
        effective = {int(v): int(w) for v, w in entry.get("effective_weights", {}).items()}
        measured = entry.get("versions", {})
        rows = []
        for version in deployment.versions:
            seen = measured.get(str(version.version), {})
            figures = seen.get("figures")
            rows.append(
                VersionRow(
                    version=version.version,
                    state=version.state,
                    weight=version.weight,
                    effective_weight=effective.get(version.version, 0),
                    servable=seen.get("servable"),
                    live_workers=seen.get("live_workers"),
                    figures=VersionFigures.model_validate(figures) if figures else None,
                )
            )
        views.append(
            ModelView(
                name=name,
                revision=deployment.revision,
                phase=deployment.rollout.phase,
                rollout_version=deployment.rollout.version,
                step=deployment.rollout.step,
                steps=deployment.policy.steps,
                next_judgement_in_s=entry.get("next_judgement_in_s"),
                changed_by=deployment.changed_by,
                changed_at=deployment.changed_at,
                versions=tuple(rows),
            )
        )
    return tuple(views)


# --- rollouts ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Timeline:
    """One rollout of one model: its decisions from the deploy on, oldest first."""

    model: str
    version: int | None
    decisions: tuple[LifecycleDecision, ...]

    @property
    def outcome(self) -> str:
        """How it ended (promote, rollback) or the last action while it is still going."""
        return self.decisions[-1].action

    def weight_after(self, decision: LifecycleDecision) -> int:
        """The share of traffic the rolled-out version had once ``decision`` took effect."""
        return decision.weights_after.get(self.version, 0) if self.version is not None else 0


def timelines(decisions: Iterable[LifecycleDecision]) -> tuple[Timeline, ...]:
    """Every rollout in the audit trail, the latest started first: a ``deploy`` starts one, and
    every decision about the model until its next deploy belongs to it (a readiness change of
    another version is part of what the rollout went through). Decisions before any deploy (the
    seed, readiness at start, rules) form a timeline without a version."""
    by_model: dict[str, list[LifecycleDecision]] = {}
    for decision in decisions:
        by_model.setdefault(decision.model, []).append(decision)
    found: list[Timeline] = []
    for model, ordered in by_model.items():
        current: list[LifecycleDecision] = []
        version: int | None = None
        for decision in sorted(ordered, key=lambda d: d.decided_at):
            if decision.action == "deploy":
                if current:
                    found.append(Timeline(model, version, tuple(current)))
                current, version = [], decision.version
            current.append(decision)
        if current:
            found.append(Timeline(model, version, tuple(current)))
    return tuple(sorted(found, key=lambda t: t.decisions[0].decided_at, reverse=True))


# --- dead letters and lag ----------------------------------------------------------------------


# pydantic's errors quote the value they refused (``input_value=b'...'``): a dead letter's reason
# may carry a piece of the record. The console shows the error without it, and counts alike
# errors together.
_INPUT_VALUE = re.compile(r"input_value=.*?, input_type=", re.S)


def _without_values(reason: str) -> str:
    return _INPUT_VALUE.sub("input_value=(hidden), input_type=", reason)


@dataclass(frozen=True)
class DeadLetterCount:
    """How many entries of one dead-letter topic share one reason."""

    topic: str
    reason: str
    count: int


# The dead letters page counts at most this many of the newest entries per partition.
DEAD_LETTERS_PER_PARTITION = 1000
# The rollouts page draws at most this many of the newest audit decisions per partition: the
# audit topic is kept for good, so reading all of it would grow with every decision ever made.
AUDIT_DECISIONS_PER_PARTITION = 1000


def dead_letter_reason(value: bytes) -> str:
    """Why one dead letter is there: ``medmesh dlq``'s one-line summary (at most 300 characters),
    without the values pydantic quotes. The console keeps this, never the value, of each entry
    it reads: a value may take MEDMESH_DEAD_LETTER_MAX_BYTES."""
    try:
        event = json.loads(value)
        reason = summary(event) if isinstance(event, dict) else "not a JSON object"
    except ValueError:
        reason = "not JSON"
    return _without_values(reason) or "(no reason given)"


def dead_letter_counts(entries: Iterable[tuple[str, str]]) -> tuple[DeadLetterCount, ...]:
    """(topic, reason) pairs (``dead_letter_reason``) counted per topic and reason, most
    frequent first."""
    counts: Counter[tuple[str, str]] = Counter(entries)
    return tuple(
        DeadLetterCount(topic, reason, n)
        for (topic, reason), n in sorted(counts.items(), key=lambda c: (c[0][0], -c[1], c[0][1]))
    )


@dataclass(frozen=True)
class LagRow:
    """One consumer group's lag on one topic."""

    group: str
    topic: str | None  # None: the group has committed no offset yet
    lag: int | None


def lag_rows(lags: Mapping[str, Mapping[str, int]]) -> tuple[LagRow, ...]:
    """Lag per group and topic as rows, in name order; a group without committed offsets gets
    one row that says so."""
    rows: list[LagRow] = []
    for group, per_topic in sorted(lags.items()):
        if not per_topic:
            rows.append(LagRow(group, None, None))
        rows.extend(LagRow(group, topic, lag) for topic, lag in sorted(per_topic.items()))
    return tuple(rows)


# --- reports -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReportRow:
    """What the console shows of one report: no subject reference, name or value."""

    pseudonym: str
    model: str
    version: str
    band: str
    at: datetime


@dataclass(frozen=True)
class ReportRecord:
    """One record of medmesh.reports.diagnostic as read."""

    key: bytes | None
    value: bytes
    headers: dict[str, str]
    timestamp_ms: int


def report_rows(records: Iterable[ReportRecord], limit: int) -> tuple[tuple[ReportRow, ...], int]:
    """The newest ``limit`` reports, newest first, and how many records were not readable as a
    report Bundle (counted, never shown)."""
    rows, unreadable = [], 0
    for record in records:
        try:
            found = summarize(record.key, record.value, record.headers)
        except (ValueError, KeyError, TypeError, IndexError):
            unreadable += 1
            continue
        rows.append(
            ReportRow(
                pseudonym=found.patient_pseudonym,
                model=found.model,
                version=found.model_version,
                band=found.band,
                at=datetime.fromtimestamp(record.timestamp_ms / 1000, UTC),
            )
        )
    rows.sort(key=lambda r: r.at, reverse=True)
    return tuple(rows[:limit]), unreadable
