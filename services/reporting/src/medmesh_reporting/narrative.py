"""The human-readable narrative (``Resource.text``) of each resource of a report.

FHIR asks every DomainResource for a narrative (dom-6), so that a reader without software that
knows the codes can still read it. Ours is generated from the same facts as the resource's data
(``text.status`` "generated"): the result and its band or interpretation, the inputs it was
computed from and when they were observed, the model version, and the AI disclaimer.

Safe by construction: every text (model specs and events are inputs, not markup) is escaped, and
stripped of the characters XML cannot hold, when it becomes markup; elements come from a short
list FHIR narratives allow; no element carries an attribute (no event handlers, links or styles).

The Device's narrative names the model only: the Device is shared by every report of the model
version on the FHIR server (created once, by identifier), so it must not carry one patient's facts.
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cached_property, lru_cache
from typing import Any, Literal, NewType

from medmesh_contracts.events import ModelInput
from medmesh_contracts.formatting import format_number, human_unit
from medmesh_contracts.modelspec import ModelSpec

JsonDict = dict[str, Any]

XHTML_NAMESPACE = "http://www.w3.org/1999/xhtml"

# A subset of the elements FHIR allows in a narrative (txt-1), enough for short tables.
Tag = Literal["p", "b", "ul", "li", "table", "tr", "th", "td"]

# XHTML that is safe to embed: escaped text (``escape``) inside the elements ``element`` writes.
# A type, not a class: mypy refuses plain text where markup is due, at no cost per string.
Markup = NewType("Markup", str)
NOTHING = Markup("")

# Characters an XML document cannot contain (XML 1.0, "Char"): an event or spec holding one must
# not make the narrative unreadable by every XML parser, so each becomes U+FFFD.
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")
# Most texts need neither escaping nor replacing: one search tells (a report escapes ~100 texts).
_NEEDS_ESCAPING = re.compile("[&<>\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")

# How numbers and units read is medmesh_contracts.formatting (the CLI's report lines use it too);
# a narrative also says "1 point", not "1 points".
_SINGULAR = {"points": "point", "beats": "beat"}


def escape(text: str) -> Markup:
    """Text as XHTML character data: markup characters escaped, non-XML characters replaced."""
    if _NEEDS_ESCAPING.search(text) is None:
        return Markup(text)
    return Markup(html.escape(_NOT_XML.sub("\ufffd", text), quote=False))


def element(tag: Tag, *content: Markup) -> Markup:
    """``<tag>content</tag>``."""
    return Markup(f"<{tag}>{''.join(content)}</{tag}>")


def paragraph(label: str, text: str) -> Markup:
    """``<p><b>label: </b>text</p>``, both escaped."""
    return Markup(f"<p><b>{escape(label)}: </b>{escape(text)}</p>")


def narrative(*content: Markup) -> JsonDict:
    """A generated FHIR Narrative whose XHTML ``div`` holds the given paragraphs and tables."""
    inner = "".join(content)
    return {"status": "generated", "div": f'<div xmlns="{XHTML_NAMESPACE}">{inner}</div>'}


# --- how values read ---------------------------------------------------------------------------


def measurement(value: float, ucum_code: str) -> str:
    """A number with its unit as people read them (``38.4 °C``, ``2 points``, ``0``)."""
    unit, shown = human_unit(ucum_code), format_number(value)
    if shown == "1":
        unit = _SINGULAR.get(unit, unit)
    return f"{shown} {unit}" if unit else shown


# Inputs are mostly observed at a few times: each is formatted once (strftime is the slow part).
@lru_cache(maxsize=1024)
def moment(at: datetime) -> str:
    """A time as clinicians read it, in UTC to the minute (``2026-11-23 08:30 UTC``)."""
    return at.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


def concept_text(concept: JsonDict) -> str:
    """A CodeableConcept as read: its text, else its first coding's display, else that code."""
    if concept.get("text"):
        return str(concept["text"])
    for coding in concept.get("coding", []):
        return str(coding.get("display") or coding.get("code", ""))
    return ""


def _value_text(element_: JsonDict) -> str:
    """The value[x] (or data-absent reason) of an Observation or component, as read."""
    if "valueInteger" in element_:
        return str(element_["valueInteger"])
    if "valueQuantity" in element_:
        quantity = element_["valueQuantity"]
        return measurement(quantity["value"], quantity.get("code") or quantity.get("unit", ""))
    if "valueCodeableConcept" in element_:
        return concept_text(element_["valueCodeableConcept"])
    if "dataAbsentReason" in element_:
        return f"no value ({concept_text(element_['dataAbsentReason'])})"
    return ""


def _row(cell: Literal["th", "td"], cells: Iterable[str]) -> Markup:
    return Markup(f"<tr>{''.join([f'<{cell}>{escape(c)}</{cell}>' for c in cells])}</tr>")


def _table(header: tuple[str, ...], rows: Iterable[Iterable[str]]) -> Markup:
    """A table with a header row; nothing when there are no rows."""
    body = [_row("td", r) for r in rows]
    return element("table", _row("th", header), *body) if body else NOTHING


# --- the shared parts ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Context:
    """What every narrative of one report says: the model version, the inputs, the times.

    ``inputs`` is the inputs table, rendered once per report: the same in every resource.
    """

    model_label: str
    model_display: str
    algorithm: str
    disclaimer: str
    inputs: Markup
    effective_at: datetime
    issued_at: datetime

    @cached_property
    def model_line(self) -> Markup:
        return paragraph("Model", f"{self.model_display} ({self.model_label}): {self.algorithm}")

    @cached_property
    def times(self) -> Markup:
        return Markup(
            f"<p><b>Effective: </b>{escape(moment(self.effective_at))}"
            f"<b> Issued: </b>{escape(moment(self.issued_at))}</p>"
        )

    @cached_property
    def disclaimer_line(self) -> Markup:
        return element("p", element("b", escape(self.disclaimer)))


def inputs_table(spec: ModelSpec, inputs: Sequence[ModelInput]) -> Markup:
    """The model's inputs, their values and when each was observed, as one table."""
    displays = {i.name: i.display for i in spec.inputs}
    return _table(
        ("Input", "Value", "Observed"),
        (
            (
                displays.get(item.name, item.name),
                _input_value(item),
                moment(item.observed_at) if item.observed_at else "no reading: model default",
            )
            for item in inputs
        ),
    )


def _input_value(item: ModelInput) -> str:
    if item.samples is not None:
        duration = f"{format_number(item.duration_s)} s " if item.duration_s is not None else ""
        return f"{duration}signal, {len(item.samples)} samples in {human_unit(item.unit)}"
    return measurement(item.value, item.unit)


# --- one narrative per resource -----------------------------------------------------------------


def observation_summary(observation: JsonDict) -> tuple[str, str, str]:
    """What an Observation found: its code, its value, its interpretation (band), as read."""
    interpretation = observation.get("interpretation") or [{}]
    return (
        concept_text(observation["code"]),
        _value_text(observation),
        concept_text(interpretation[0]),
    )


def observation_text(observation: JsonDict, context: Context) -> JsonDict:
    """An Observation's narrative: its finding and band, range, components, inputs, model."""
    code, value, interpretation = observation_summary(observation)
    ranges = [r["text"] for r in observation.get("referenceRange", []) if r.get("text")]
    components = (
        (concept_text(c["code"]), _value_text(c)) for c in observation.get("component", [])
    )
    return narrative(
        paragraph(code, value),
        paragraph("Interpretation", interpretation) if interpretation else NOTHING,
        *(paragraph("Reference range", r) for r in ranges),
        _table(("Component", "Value"), components),
        context.times,
        _INPUTS_HEADING,
        context.inputs,
        context.model_line,
        context.disclaimer_line,
    )


_INPUTS_HEADING = element("p", element("b", escape("Inputs")))


def report_text(report: JsonDict, observations: Sequence[JsonDict], context: Context) -> JsonDict:
    """A DiagnosticReport's narrative: its conclusion, each result, inputs, times, model."""
    return narrative(
        element("p", element("b", escape(concept_text(report["code"])))),
        paragraph("Conclusion", report["conclusion"]),
        _table(
            ("Result", "Value", "Interpretation"),
            (observation_summary(o) for o in observations),
        ),
        context.times,
        _INPUTS_HEADING,
        context.inputs,
        context.model_line,
        context.disclaimer_line,
    )


def device_text(
    context: Context, *, model_name: str, triton_version: str, owner: str, notes: Sequence[str]
) -> JsonDict:
    """The Device's narrative: the AI model version, its owner and card; no patient facts."""
    return narrative(
        paragraph("AI model", f"{context.model_display} ({model_name})"),
        _table(
            ("Detail", "Value"),
            [
                ("Model version", context.model_label),
                ("Triton model version", triton_version),
                ("Owner", owner),
                ("Algorithm", context.algorithm),
            ],
        ),
        element("ul", *(element("li", escape(n)) for n in notes)) if notes else NOTHING,
        context.disclaimer_line,
    )


def provenance_text(context: Context, *, occurred_at: datetime, results: int) -> JsonDict:
    """The Provenance's narrative: which model created the report when, and from which inputs."""
    made = "1 result" if results == 1 else f"{results} results"
    return narrative(
        paragraph(
            "Created",
            f"the report and its {made}, by the AI model {context.model_label},"
            f" at {moment(occurred_at)}",
        ),
        paragraph("Recorded", moment(context.issued_at)),
        element("p", element("b", escape("Sources"))),
        context.inputs,
        context.model_line,
        context.disclaimer_line,
    )
