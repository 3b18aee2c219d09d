"""Our own conformance checks of a report Bundle: what fhir.resources does not check.

fhir.resources validates structure and datatypes only: it accepts ``status: "bogus"``, a
subject that points at an Observation and a reference to a ``urn:uuid`` that is nowhere in the
Bundle. ``check_report_bundle`` checks those, and the rules medmesh holds its own
reports to (AI label, Provenance, effective and issued times, a safe generated narrative on every
resource: fhir.resources does not look inside ``text.div`` at all). Each problem is one line that starts
with a FHIRPath-like location, e.g. ``Bundle.entry[1].resource.ofType(Observation).status``.

The rules are tables (required value sets, allowed reference targets) and small functions; add a
row or a function to add a rule.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, get_args

from medmesh_contracts.modelspec import DATA_ABSENT_REASON, DataAbsentReason
from medmesh_reporting.report import V3_INTERPRETATION, V3_OBSERVATION_VALUE, JsonDict

# --- tables -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class CodeRule:
    """An element whose code must come from a required (closed) value set."""

    resource_type: str
    path: str
    value_set: str
    codes: frozenset[str]


@dataclass(frozen=True)
class ReferenceRule:
    """A Reference element and the resource types it may point at (R4B)."""

    resource_type: str
    path: str
    targets: frozenset[str]


def _codes(words: str) -> frozenset[str]:
    return frozenset(words.split())


BUNDLE_TYPE_RULE = CodeRule(
    "Bundle",
    "type",
    "bundle-type",
    _codes(
        "document message transaction transaction-response batch batch-response history"
        " searchset collection"
    ),
)

CODE_RULES: tuple[CodeRule, ...] = (
    CodeRule(
        "DiagnosticReport",
        "status",
        "diagnostic-report-status",
        _codes(
            "registered partial preliminary final amended corrected appended cancelled"
            " entered-in-error unknown"
        ),
    ),
    CodeRule(
        "Observation",
        "status",
        "observation-status",
        _codes("registered preliminary final amended corrected cancelled entered-in-error unknown"),
    ),
    CodeRule(
        "Device",
        "status",
        "device-status",
        _codes("active inactive entered-in-error unknown"),
    ),
    CodeRule(
        "Provenance",
        "entity.role",
        "provenance-entity-role",
        _codes("derivation revision quotation source removal"),
    ),
)

# R5 dropped "derivation" from provenance-entity-role and added "instantiates".
R5_CODE_RULES: tuple[CodeRule, ...] = tuple(
    CodeRule(
        r.resource_type,
        r.path,
        r.value_set,
        _codes("revision quotation source instantiates removal"),
    )
    if r.value_set == "provenance-entity-role"
    else r
    for r in CODE_RULES
)

_SUBJECTS = _codes("Patient Group Device Location")
_ORDERS = _codes(
    "CarePlan ImmunizationRecommendation MedicationRequest NutritionOrder ServiceRequest"
)
_AGENTS = _codes("Practitioner PractitionerRole RelatedPerson Patient Device Organization")

REFERENCE_RULES: tuple[ReferenceRule, ...] = (
    ReferenceRule("DiagnosticReport", "subject", _SUBJECTS),
    ReferenceRule("DiagnosticReport", "encounter", _codes("Encounter")),
    ReferenceRule("DiagnosticReport", "basedOn", _ORDERS),
    ReferenceRule(
        "DiagnosticReport",
        "performer",
        _codes("Practitioner PractitionerRole Organization CareTeam"),
    ),
    ReferenceRule("DiagnosticReport", "result", _codes("Observation")),
    ReferenceRule("Observation", "subject", _SUBJECTS),
    ReferenceRule("Observation", "encounter", _codes("Encounter")),
    ReferenceRule("Observation", "basedOn", _ORDERS | {"DeviceRequest"}),
    ReferenceRule("Observation", "device", _codes("Device DeviceMetric")),
    ReferenceRule(
        "Observation",
        "derivedFrom",
        _codes(
            "DocumentReference ImagingStudy Media QuestionnaireResponse Observation"
            " MolecularSequence"
        ),
    ),
    ReferenceRule("Device", "owner", _codes("Organization")),
    ReferenceRule("Provenance", "agent.who", _AGENTS),
    ReferenceRule("Provenance", "agent.onBehalfOf", _AGENTS - {"Device"}),
)


# Resources that are not DomainResources have no narrative (a report Bundle holds none of them).
NO_NARRATIVE = _codes("Bundle Binary Parameters")

XHTML = "http://www.w3.org/1999/xhtml"
# The elements a FHIR narrative may hold (txt-1: HTML 4.0 chapters 7-11 and 15, less forms and
# scripts, plus a and img).
NARRATIVE_ELEMENTS = _codes(
    "a abbr acronym b big blockquote br caption cite code col colgroup dd dfn div dl dt em"
    " h1 h2 h3 h4 h5 h6 hr i img kbd li ol p pre q samp small span strong sub sup table tbody"
    " td tfoot th thead tr tt ul var"
)
# Attributes whose value is a link: a script there runs like an event handler.
LINK_ATTRIBUTES = _codes("href src")


# --- walking the Bundle -----------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One Bundle entry's resource, with its location and the Bundle's fullUrl index."""

    location: str
    resource: JsonDict
    types_by_url: dict[str, str]
    fhir_version: str = "R4B"

    @property
    def resource_type(self) -> str:
        """The entry's resourceType ('' when missing)."""
        return str(self.resource.get("resourceType", ""))


def _values(node: Any, path: str, location: str) -> Iterator[tuple[str, Any]]:
    """Every value at a dotted path, with its location; lists are expanded with their index."""
    head, _, rest = path.partition(".")
    value = node.get(head) if isinstance(node, dict) else None
    if isinstance(value, list):
        items = [(f"{location}.{head}[{i}]", item) for i, item in enumerate(value)]
    else:
        items = [(f"{location}.{head}", value)]
    for where, item in items:
        if item is None:
            continue
        if rest:
            yield from _values(item, rest, where)
        else:
            yield where, item


def _target_type(reference: JsonDict, types_by_url: dict[str, str]) -> str | None:
    """The resource type a Reference points at, when it can be told; None when it cannot."""
    literal = reference.get("reference")
    if isinstance(literal, str):
        if literal.startswith("urn:"):
            return types_by_url.get(literal)
        parts = literal.split("/_history/")[0].rstrip("/").split("/")
        if len(parts) >= 2:
            return parts[-2]
        return None
    declared = reference.get("type")
    return declared if isinstance(declared, str) else None


# --- rules on one resource --------------------------------------------------------------------


def _check_codes(entry: Entry) -> Iterator[str]:
    for rule in R5_CODE_RULES if entry.fhir_version == "R5" else CODE_RULES:
        if rule.resource_type != entry.resource_type:
            continue
        for where, value in _values(entry.resource, rule.path, entry.location):
            if value not in rule.codes:
                yield f"{where}: {value!r} is not in the required value set {rule.value_set}"


def _check_reference_targets(entry: Entry) -> Iterator[str]:
    for rule in REFERENCE_RULES:
        if rule.resource_type != entry.resource_type:
            continue
        for where, reference in _values(entry.resource, rule.path, entry.location):
            if not isinstance(reference, dict):
                yield f"{where}: is not a Reference"
                continue
            target = _target_type(reference, entry.types_by_url)
            if target is not None and target not in rule.targets:
                allowed = "|".join(sorted(rule.targets))
                yield f"{where}: points at {target}, allowed are {allowed}"


def _check_bundle_references_resolve(entry: Entry) -> Iterator[str]:
    for where, literal in _references(entry.resource, entry.location):
        if literal.startswith("urn:uuid:") and literal not in entry.types_by_url:
            yield f"{where}: {literal} does not resolve to an entry of the Bundle"


def _references(node: Any, location: str) -> Iterator[tuple[str, str]]:
    """Every Reference.reference string anywhere under a node, with its location."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "reference" and isinstance(value, str):
                yield f"{location}.reference", value
            else:
                yield from _references(value, f"{location}.{key}")
    elif isinstance(node, list):
        for i, item in enumerate(node):
            yield from _references(item, f"{location}[{i}]")


def _has_aiast(resource: JsonDict) -> bool:
    meta = resource.get("meta")
    security = meta.get("security", []) if isinstance(meta, dict) else []
    return any(
        isinstance(c, dict) and c.get("system") == V3_OBSERVATION_VALUE and c.get("code") == "AIAST"
        for c in security
    )


def _check_ai_label(entry: Entry) -> Iterator[str]:
    if entry.resource_type in {"DiagnosticReport", "Observation"} and not _has_aiast(
        entry.resource
    ):
        yield f"{entry.location}.meta.security: AI output lacks the AIAST label"


def _check_report_elements(entry: Entry) -> Iterator[str]:
    if entry.resource_type != "DiagnosticReport":
        return
    report = entry.resource
    if "effectiveDateTime" not in report and "effectivePeriod" not in report:
        yield f"{entry.location}.effective: a report needs effective[x]"
    for element in ("issued", "result", "conclusion"):
        if not report.get(element):
            yield f"{entry.location}.{element}: a report needs {element}"


_DATA_ABSENT_CODES = frozenset(get_args(DataAbsentReason))


def _value_or_absent_reason(element: JsonDict, location: str, what: str) -> Iterator[str]:
    """An Observation (or component) has value[x] or dataAbsentReason, never both (obs-6); the
    reason carries a code of the data-absent-reason code system."""
    has_value = any(key.startswith("value") for key in element)
    reason = element.get("dataAbsentReason")
    if not has_value and reason is None:
        yield f"{location}.value: {what} needs value[x] or dataAbsentReason"
    if has_value and reason is not None:
        yield f"{location}.dataAbsentReason: only when value[x] is absent (obs-6)"
    elif reason is not None:
        codings = reason.get("coding", []) if isinstance(reason, dict) else []
        if not any(
            isinstance(c, dict)
            and c.get("system") == DATA_ABSENT_REASON
            and c.get("code") in _DATA_ABSENT_CODES
            for c in codings
        ):
            yield f"{location}.dataAbsentReason.coding: no code from {DATA_ABSENT_REASON}"


def _check_observation_value(entry: Entry) -> Iterator[str]:
    if entry.resource_type != "Observation":
        return
    observation = entry.resource
    yield from _value_or_absent_reason(observation, entry.location, "an Observation")
    for where, component in _values(observation, "component", entry.location):
        if isinstance(component, dict):
            yield from _value_or_absent_reason(component, where, "a component")
    for where, reference_range in _values(observation, "referenceRange", entry.location):
        if not isinstance(reference_range, dict) or not (
            {"low", "high", "text"} & reference_range.keys()
        ):
            yield f"{where}: a reference range needs low, high or text (obs-3)"


def _check_interpretation_system(entry: Entry) -> Iterator[str]:
    if entry.resource_type != "Observation":
        return
    for where, concept in _values(entry.resource, "interpretation", entry.location):
        codings = concept.get("coding", []) if isinstance(concept, dict) else []
        if not any(isinstance(c, dict) and c.get("system") == V3_INTERPRETATION for c in codings):
            yield f"{where}.coding: no coding from {V3_INTERPRETATION}"


def _check_narrative(entry: Entry) -> Iterator[str]:
    """Every resource carries a generated narrative (dom-6) whose div is XHTML with only the
    elements FHIR allows (txt-1), no event handler or script link (txt-3), and some text
    (txt-2)."""
    if entry.resource_type in NO_NARRATIVE:
        return
    where = f"{entry.location}.text"
    text = entry.resource.get("text")
    if not isinstance(text, dict):
        yield f"{where}: a medmesh resource needs a narrative (dom-6)"
        return
    if text.get("status") != "generated":
        yield f"{where}.status: {text.get('status')!r}, medmesh narratives are 'generated'"
    div = text.get("div")
    if not isinstance(div, str):
        yield f"{where}.div: a narrative needs its XHTML div"
        return
    yield from _xhtml_problems(div, f"{where}.div")


def _xhtml_problems(div: str, where: str) -> Iterator[str]:
    try:
        # Our own builder's output, in tests: not untrusted input.
        root = ET.fromstring(div)  # noqa: S314
    except ET.ParseError as exc:
        yield f"{where}: not well-formed XML ({exc})"
        return
    if root.tag != f"{{{XHTML}}}div":
        yield f"{where}: the root must be a div in the XHTML namespace, found {root.tag}"
        return
    for node in root.iter():
        namespace, _, name = node.tag.rpartition("}")
        if namespace != f"{{{XHTML}" or name not in NARRATIVE_ELEMENTS:
            yield f"{where}: <{name}> is not allowed in a narrative (txt-1)"
        for attribute, value in node.attrib.items():
            local = attribute.rpartition("}")[2].lower()
            if local.startswith("on"):
                yield f"{where}: <{name}> has the event handler {local} (txt-3)"
            elif local in LINK_ATTRIBUTES and value.strip().lower().startswith("javascript:"):
                yield f"{where}: <{name}> {local} is a script (txt-3)"
    if not "".join(root.itertext()).strip():
        yield f"{where}: a narrative needs some text (txt-2)"


ResourceRule = Callable[[Entry], Iterator[str]]

RESOURCE_RULES: tuple[ResourceRule, ...] = (
    _check_codes,
    _check_reference_targets,
    _check_bundle_references_resolve,
    _check_ai_label,
    _check_report_elements,
    _check_observation_value,
    _check_interpretation_system,
    _check_narrative,
)


# --- rules on the whole Bundle ----------------------------------------------------------------


def _check_bundle_type(bundle: JsonDict) -> Iterator[str]:
    rule = BUNDLE_TYPE_RULE
    value = bundle.get(rule.path)
    if value not in rule.codes:
        yield f"Bundle.type: {value!r} is not in the required value set {rule.value_set}"


def _check_contents(entries: list[Entry]) -> Iterator[str]:
    types = [e.resource_type for e in entries]
    reports = types.count("DiagnosticReport")
    if reports != 1:
        yield f"Bundle.entry: a report Bundle holds one DiagnosticReport, found {reports}"
    if "Provenance" not in types:
        yield "Bundle.entry: a report Bundle needs a Provenance of the AI output"


def check_report_bundle(bundle: dict[str, Any], fhir_version: str = "R4B") -> list[str]:
    """Problems of a report Bundle that fhir.resources does not find; empty when conformant.

    ``fhir_version`` ("R4", "R4B" or "R5") selects the value sets that differ between the
    versions (R4's are R4B's for every element checked here; the reference targets checked are
    R4's, which R4B widened for the subjects).
    """
    if bundle.get("resourceType") != "Bundle":
        return [f"Bundle.resourceType: expected 'Bundle', got {bundle.get('resourceType')!r}"]
    problems = list(_check_bundle_type(bundle))
    raw_entries = bundle.get("entry") or []
    types_by_url: dict[str, str] = {}
    for i, raw in enumerate(raw_entries):
        url = raw.get("fullUrl") if isinstance(raw, dict) else None
        if isinstance(url, str) and url in types_by_url:
            problems.append(f"Bundle.entry[{i}].fullUrl: {url} is used by another entry")
        resource = raw.get("resource") if isinstance(raw, dict) else None
        if isinstance(url, str) and isinstance(resource, dict):
            types_by_url[url] = str(resource.get("resourceType", ""))
    entries: list[Entry] = []
    for i, raw in enumerate(raw_entries):
        resource = raw.get("resource") if isinstance(raw, dict) else None
        if not isinstance(resource, dict):
            problems.append(f"Bundle.entry[{i}].resource: missing")
            continue
        kind = resource.get("resourceType")
        location = f"Bundle.entry[{i}].resource.ofType({kind})"
        entries.append(Entry(location, resource, types_by_url, fhir_version))
    problems.extend(_check_contents(entries))
    for entry in entries:
        for rule in RESOURCE_RULES:
            problems.extend(rule(entry))
    return problems
