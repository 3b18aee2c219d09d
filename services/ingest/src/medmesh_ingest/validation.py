"""Parsing and checking inbound FHIR payloads (R4B, or R4 or R5 when asked), before extraction.

R4 (4.0.1) payloads are validated with fhir.resources' R4B models: fhir.resources has no R4
models, and R4B is a technical correction of R4 whose definitions of the resources medmesh reads
are R4's (``medmesh_ingest.r4`` says what was compared); the R4 types R4B cannot judge are
refused, naming the type.

``parse`` turns raw bytes into the resources to consider (and, for Subscription notifications,
what kind of notification it is and which resources it only names), or raises ``FhirRejected``
with an OperationOutcome. fhir.resources checks structure and datatypes; it does not check code
values, reference target types or Bundle types, so those checks are made here (the answers they
give: README.md, "HTTP answers of ingest").
Size limits are checked before any model is built: the number of JSON objects and arrays
before the JSON is even decoded (a cheap count of the brackets outside strings, so that no body
of millions of tiny containers is ever built in memory), then nesting depth and Bundle entries;
the number of points of each waveform (SampledData) and how long its signal lasts right after.

A batch Bundle answered entry by entry (``isolate_entries``, the HTTP path) keeps its entries
apart: an entry that fails a check is set aside (``Payload.failed``, with the status and issues
it would have got alone) and the others go on. What concerns the Bundle itself (JSON, limits,
Bundle.type, an error located in no entry) still rejects the whole payload, as does any error
in every other kind of payload.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fhir.resources import get_fhir_model_class as r5_model_class
from fhir.resources.R4B import get_fhir_model_class as r4b_model_class
from fhir.resources.R4B.resource import Resource as R4BResource
from fhir.resources.resource import Resource as R5Resource
from pydantic import ValidationError
from pydantic_core import ErrorDetails

from medmesh_contracts.events import FhirVersion
from medmesh_ingest import r4
from medmesh_ingest.imaging import IMAGING_STUDY_STATUSES
from medmesh_ingest.outcomes import (
    INVALID_FHIR,
    NOT_FHIR,
    TOO_LARGE,
    FhirRejected,
    Issue,
    rejected,
    rejection,
)
from medmesh_ingest.waveforms import sample_count, signal_seconds

# R4B value sets of the codes we check ourselves.
OBSERVATION_STATUSES = frozenset(
    {
        "registered",
        "preliminary",
        "final",
        "amended",
        "corrected",
        "cancelled",
        "entered-in-error",
        "unknown",
    }
)
REQUEST_STATUSES = frozenset(
    {"draft", "active", "on-hold", "revoked", "completed", "entered-in-error", "unknown"}
)
REQUEST_INTENTS = frozenset(
    {
        "proposal",
        "plan",
        "directive",
        "order",
        "original-order",
        "reflex-order",
        "filler-order",
        "instance-order",
        "option",
    }
)
BUNDLE_TYPES = frozenset(
    {
        "document",
        "message",
        "transaction",
        "transaction-response",
        "batch",
        "batch-response",
        "history",
        "searchset",
        "collection",
    }
)
# R4B added one Bundle type, R5 kept it: the Subscription notification.
R5_BUNDLE_TYPES = BUNDLE_TYPES | {"subscription-notification"}
BUNDLE_TYPES_BY_VERSION: Mapping[FhirVersion, frozenset[str]] = {
    "R4": BUNDLE_TYPES,
    "R4B": R5_BUNDLE_TYPES,
    "R5": R5_BUNDLE_TYPES,
}
NOTIFICATION_TYPES = frozenset(
    {"handshake", "heartbeat", "event-notification", "query-status", "query-event"}
)
HTTP_VERBS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH"})

ACCEPTED_BUNDLE_TYPES = ("collection", "batch", "transaction", "message")
# Bundle types accepted only as Subscription notifications (first entry a SubscriptionStatus;
# in R4, the Subscriptions Backport IG's Parameters). R4 and R4B senders follow the backport IG
# (a history Bundle); R4B also has the subscription-notification type R5 uses, which is read
# the same way.
NOTIFICATION_BUNDLE_TYPES: Mapping[FhirVersion, frozenset[str]] = {
    "R4": frozenset({"history"}),
    "R4B": frozenset({"history", "subscription-notification"}),
    "R5": frozenset({"subscription-notification"}),
}

# Coded elements checked per resource type: (element, allowed codes, value set name).
_CODED_ELEMENTS: Mapping[str, tuple[tuple[str, frozenset[str], str], ...]] = {
    "Observation": (("status", OBSERVATION_STATUSES, "observation-status"),),
    "ServiceRequest": (
        ("status", REQUEST_STATUSES, "request-status"),
        ("intent", REQUEST_INTENTS, "request-intent"),
    ),
    "SubscriptionStatus": (("type", NOTIFICATION_TYPES, "subscription-notification-type"),),
    "ImagingStudy": (("status", IMAGING_STUDY_STATUSES, "imagingstudy-status"),),
}
# Reference elements checked per resource type: (element, the resource type it must target).
_REFERENCE_ELEMENTS: Mapping[str, tuple[tuple[str, str], ...]] = {
    "Observation": (("subject", "Patient"), ("encounter", "Encounter")),
    "ServiceRequest": (("subject", "Patient"), ("encounter", "Encounter")),
    "ImagingStudy": (("subject", "Patient"), ("encounter", "Encounter")),
}

# A FHIRPath into one entry of a Bundle: ``Bundle.entry[3]`` or ``Bundle.entry[3].resource...``.
_ENTRY_PATH = re.compile(r"^Bundle\.entry\[(\d+)\](?:\.|$)")
_RESOURCE_TYPE_NAME = re.compile(r"^[A-Z][A-Za-z]{1,63}$")
_FHIR_ELEMENT_NAME = re.compile(r"^_?[A-Za-z][A-Za-z0-9_]*$")
# Relative or absolute literal reference: [base/]Type/id[/_history/version].
_LITERAL_REFERENCE = re.compile(
    r"(?:^|/)(?P<type>[A-Z][A-Za-z]+)/[A-Za-z0-9\-.]{1,64}(?:/_history/[A-Za-z0-9\-.]{1,64})?$"
)
# Python field names of fhir.resources that differ from the JSON element names in error locations.
_JSON_NAMES = {"resource_type": "resourceType"}
# Shorter input values are not scrubbed from messages: they would mangle the message text and
# cannot identify anyone.
_MIN_SCRUBBED_LENGTH = 3
# A JSON string (its brackets open no container). An unterminated one runs to the end of the
# text (json.loads stops there: nothing after it is decoded): so every match attempt succeeds
# without backtracking and the scan stays linear (with a plain closing quote, a quote followed
# by a million escaped quotes took hours: each of them started a new failing attempt).
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*(?:"|\\?\Z)', re.DOTALL)


@dataclass(frozen=True)
class ParsedResource:
    """A validated resource of the payload and where it sits in it.

    ``resource`` is the fhir.resources R4B model. ``expression`` is its FHIRPath in the payload
    (``Observation`` or ``Bundle.entry[2].resource``), to locate issues. References to other
    entries of a Bundle (``urn:uuid:...``) are already resolved in ``subject_reference`` and
    ``encounter_reference``: to ``Type/id`` when the target entry has an id, else to the urn.
    """

    resource: Any
    expression: str
    full_url: str | None = None
    subject_reference: str | None = None
    encounter_reference: str | None = None

    @property
    def resource_type(self) -> str:
        """The FHIR resource type, e.g. ``Observation``."""
        return str(self.resource.get_resource_type())

    @property
    def reference(self) -> str | None:
        """How other resources refer to this one: ``Type/id``, else its Bundle fullUrl."""
        if self.resource.id:
            return f"{self.resource_type}/{self.resource.id}"
        return self.full_url


@dataclass(frozen=True)
class Limits:
    """How large a payload may be, beyond its size in bytes."""

    max_depth: int = 32
    max_entries: int = 1000
    # Most points one SampledData (a waveform, e.g. an ECG lead) may hold.
    max_waveform_samples: int = 60_000
    # Longest signal one SampledData may carry: (points - 1) x its period, in seconds.
    max_waveform_seconds: float = 3600.0
    # Most JSON objects and arrays one payload may hold (counted before it is decoded).
    max_nodes: int = 100_000


@dataclass(frozen=True)
class Notification:
    """A Subscription notification: its type and the resources it names but does not carry."""

    type: str
    # References (``Type/id`` or absolute URLs) of id-only content, to fetch from the source.
    id_only: tuple[str, ...] = ()
    # The Subscription it is about (its reference as the status gives it), and its event
    # counters: how many events the source has sent since the subscription started, and the
    # numbers of the events this notification carries (see ``subscriptions.py``).
    subscription: str | None = None
    events_since_start: int | None = None
    event_numbers: tuple[int, ...] = ()


@dataclass(frozen=True)
class EntryFailure:
    """An entry of a batch set aside: the HTTP status it would have got alone, and why."""

    index: int
    status: int
    issues: tuple[Issue, ...]


@dataclass(frozen=True)
class Payload:
    """A parsed payload: the resources to consider, and what kind of message it was.

    ``failed`` holds the entries of a batch set aside (only with ``isolate_entries``; their
    resources are not in ``resources``), ``entries`` how many entries the Bundle has.
    """

    resources: list[ParsedResource]
    fhir_version: FhirVersion = "R4B"
    bundle_type: str | None = None
    notification: Notification | None = None
    failed: tuple[EntryFailure, ...] = ()
    entries: int = 0


def entry_of(expression: str) -> int | None:
    """The index of the Bundle entry a FHIRPath points into (``Bundle.entry[3].resource``: 3)."""
    match = _ENTRY_PATH.match(expression)
    return int(match.group(1)) if match else None


def issue_entry(issue: Issue) -> int | None:
    """The Bundle entry an issue is located in (by its first expression); None: in none."""
    return entry_of(issue.expression[0]) if issue.expression else None


def entry_failures(status: int, issues: Sequence[Issue]) -> dict[int, EntryFailure] | None:
    """The entries the errors among ``issues`` are in, each with its issues and ``status``;
    None when an error is located in no entry (it concerns the whole payload)."""
    by_entry: dict[int, list[Issue]] = {}
    for issue in issues:
        index = issue_entry(issue)
        if index is None:
            if issue.is_error:
                return None
            continue
        by_entry.setdefault(index, []).append(issue)
    return {
        index: EntryFailure(index, status, tuple(found))
        for index, found in by_entry.items()
        if any(issue.is_error for issue in found)
    }


class _Checks:
    """Where the errors of a check go: one rejection of the whole payload, or, for a batch
    answered entry by entry, the entries they are in, set aside while the others go on."""

    def __init__(self, isolate: bool) -> None:
        self.isolate = isolate
        self.failed: dict[int, EntryFailure] = {}

    def raise_if_errors(self, issues: Sequence[Issue], status: int = INVALID_FHIR) -> None:
        """Raise FhirRejected when ``issues`` hold an error, unless every error is in an entry
        that can be set aside (then those entries are)."""
        if not any(issue.is_error for issue in issues):
            return
        found = entry_failures(status, issues) if self.isolate else None
        if found is None:
            raise rejection(status, issues)
        for index, failure in found.items():
            self.failed.setdefault(index, failure)

    def set_aside(self, index: int) -> bool:
        """Whether entry ``index`` was set aside."""
        return index in self.failed

    def kept(self, entries: Sequence[ParsedResource]) -> list[ParsedResource]:
        """The entries not set aside."""
        if not self.failed:
            return list(entries)
        return [e for e in entries if entry_of(e.expression) not in self.failed]

    def without_failed(self, data: dict[str, Any]) -> dict[str, Any]:
        """The Bundle JSON with each entry set aside replaced by an empty one (so the others
        keep their index)."""
        entries = data.get("entry")
        if not self.failed or not isinstance(entries, list):
            return data
        return {
            **data,
            "entry": [{} if i in self.failed else e for i, e in enumerate(entries)],
        }

    def full_urls(self, data: dict[str, Any]) -> frozenset[str]:
        """The fullUrls of the entries set aside (references to them resolve to nothing)."""
        entries = data.get("entry")
        if not isinstance(entries, list):
            return frozenset()
        return frozenset(
            e["fullUrl"]
            for i, e in enumerate(entries)
            if i in self.failed and isinstance(e, dict) and isinstance(e.get("fullUrl"), str)
        )


def parse(
    raw: bytes,
    resource_type_hint: str | None = None,
    fhir_version: FhirVersion = "R4B",
    limits: Limits = Limits(),
    *,
    isolate_entries: bool = False,
) -> Payload:
    """Parse and check a payload of the given FHIR version.

    ``resource_type_hint`` is the type named by the endpoint (``POST /fhir/{resourceType}``).
    Raises ``FhirRejected``: 400 when the payload is not JSON, not a FHIR resource, or not of
    the hinted type; 413 when it holds too many JSON objects and arrays, is nested too deeply,
    has too many entries, or a waveform with too many points or lasting too long; 422 when it
    is FHIR but invalid or not usable. With ``isolate_entries``, a batch Bundle's entries that
    fail a check are set aside instead (``Payload.failed``, with the status they would get).
    """
    data, unknown_types = _decode_json(raw, limits, fhir_version)
    resource_type = _resource_type_of(data, fhir_version)
    _check_hint(resource_type, resource_type_hint)
    checks = _Checks(isolate_entries and resource_type == "Bundle" and data.get("type") == "batch")
    checks.raise_if_errors(
        [_unknown_type_issue(link, resource_type, fhir_version) for link in unknown_types]
    )
    model = _validate_model(data, resource_type, fhir_version, checks)
    notification: Notification | None = None
    bundle_type: str | None = None
    count = 0
    if resource_type == "Bundle":
        bundle_type = model.type
        count = len(model.entry or ())
        entries, notification = _bundle_entries(model, fhir_version, checks)
    else:
        entries = [ParsedResource(model, resource_type)]
    _check_waveform_sizes(entries, limits, checks)
    checks.raise_if_errors(
        [issue for entry in checks.kept(entries) for issue in _coded_element_issues(entry)]
    )
    resolved = _resolve_references(checks.kept(entries), checks, checks.full_urls(data))
    failed = tuple(checks.failed[i] for i in sorted(checks.failed))
    return Payload(checks.kept(resolved), fhir_version, bundle_type, notification, failed, count)


# --- decoding ----------------------------------------------------------------------------------


def _decode_json(
    raw: bytes, limits: Limits, version: FhirVersion
) -> tuple[dict[str, Any], list[tuple[_PathLink, object]]]:
    """The decoded object, and where it nests resources of unknown type (see ``_scan``)."""
    try:
        # As json.loads decodes bytes; done here so that the node count reads the same text.
        text = raw.decode(json.detect_encoding(raw), "surrogatepass")
        _check_node_count(text, limits)
        data = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise rejected(NOT_FHIR, "structure", "The payload is not JSON.") from None
    except RecursionError:
        raise _too_deep(limits) from None
    if not isinstance(data, dict):
        raise rejected(NOT_FHIR, "structure", "The payload is not a JSON object.")
    unknown_types = _scan(data, limits, version)
    entries = data.get("entry")
    if isinstance(entries, list) and len(entries) > limits.max_entries:
        raise rejected(
            TOO_LARGE,
            "too-costly",
            f"The Bundle has {len(entries)} entries; at most {limits.max_entries} are accepted.",
            ["Bundle.entry"],
        )
    return data, unknown_types


def _check_node_count(text: str, limits: Limits) -> None:
    """413 when the JSON holds more objects and arrays than ``limits.max_nodes``.

    Counted on the text, before anything is decoded: decoding millions of empty lists takes
    hundreds of MiB, and so did walking them. Every bracket counts at first (two ``str.count``
    calls, no allocation); only when that is over the limit are the strings taken out, whose
    brackets open nothing, and the rest counted again (one copy of the text at most).
    """
    opened = text.count("[") + text.count("{")
    if opened <= limits.max_nodes:
        return
    outside_strings = _JSON_STRING.sub("", text)
    opened = outside_strings.count("[") + outside_strings.count("{")
    if opened > limits.max_nodes:
        raise rejected(
            TOO_LARGE,
            "too-costly",
            f"The JSON holds {opened} objects and arrays; at most {limits.max_nodes} are "
            "accepted (MEDMESH_MAX_JSON_NODES).",
        )


def _check_waveform_sizes(
    entries: Sequence[ParsedResource], limits: Limits, checks: _Checks
) -> None:
    """413 when an Observation's (or component's) SampledData holds more points than allowed,
    or a signal lasting longer than allowed (points x period: its resampling is bounded by the
    model's window, but nothing that long is a waveform reading). The first such waveform
    rejects the payload, or sets its entry aside (a batch answered entry by entry)."""
    for entry in entries:
        problem = _waveform_size_issue(entry, limits)
        if problem is not None:
            checks.raise_if_errors([problem], TOO_LARGE)


def _waveform_size_issue(entry: ParsedResource, limits: Limits) -> Issue | None:
    """The first waveform of the entry over the size limits, as an issue; None: none."""
    if entry.resource_type != "Observation":
        return None
    elements = [
        ("", entry.resource),
        *((f".component[{i}]", c) for i, c in enumerate(entry.resource.component or ())),
    ]
    for where, element in elements:
        sampled = element.valueSampledData
        count = sample_count(sampled)
        if count > limits.max_waveform_samples:
            path = f"{entry.expression}{where}.valueSampledData.data"
            return Issue(
                "error",
                "too-costly",
                f"{path}: the waveform has {count} points; at most "
                f"{limits.max_waveform_samples} are accepted.",
                (path,),
            )
        lasting = signal_seconds(sampled) if count else None
        if lasting is not None and lasting[1] > limits.max_waveform_seconds:
            spacing, seconds = lasting
            path = f"{entry.expression}{where}.valueSampledData.{spacing}"
            return Issue(
                "error",
                "too-costly",
                f"{path}: the waveform's {count} points at this sampling period last "
                f"{seconds:g} s; at most {limits.max_waveform_seconds:g} s are accepted "
                "(MEDMESH_MAX_WAVEFORM_SECONDS).",
                (path,),
            )
    return None


def _too_deep(limits: Limits) -> Exception:
    return rejected(
        TOO_LARGE,
        "too-costly",
        f"The JSON is nested more than {limits.max_depth} levels deep.",
    )


def _resource_type_of(data: Mapping[str, Any], version: FhirVersion) -> str:
    resource_type = data.get("resourceType")
    if not isinstance(resource_type, str):
        raise rejected(
            NOT_FHIR, "structure", "The payload is not a FHIR resource: no resourceType."
        )
    if not _is_resource_type(resource_type, version):
        reason = _unreadable_reason(resource_type, version)
        raise rejected(
            NOT_FHIR,
            "not-supported",
            f"The payload is not a FHIR resource: resourceType is not an {version} resource type."
            if reason is None
            else f"The payload's resourceType: {reason}.",
            ["resourceType"],
        )
    return resource_type


def _unreadable_reason(name: object, version: FhirVersion) -> str | None:
    """Why a resource type ingest cannot read in ``version`` is not, named (R4 only: a type
    R4B's models know but R4 has not, or the reverse); None for an unknown name."""
    if version != "R4" or not isinstance(name, str) or not _RESOURCE_TYPE_NAME.match(name):
        return None
    return r4.unreadable_reason(name)


def _model_class(name: str, version: FhirVersion) -> Any:
    return r5_model_class(name) if version == "R5" else r4b_model_class(name)


def _is_resource_type(name: object, version: FhirVersion) -> bool:
    if not isinstance(name, str) or not _RESOURCE_TYPE_NAME.match(name):
        return False
    return _is_resource_type_name(name, version)


@functools.lru_cache(maxsize=1024)
def _is_resource_type_name(name: str, version: FhirVersion) -> bool:
    """Whether ``name`` is a concrete resource type of ``version`` (cached: a class lookup)."""
    if name in ("Resource", "DomainResource", "CanonicalResource", "MetadataResource"):
        return False  # abstract
    if version == "R4" and r4.unreadable_reason(name) is not None:
        return False
    try:
        model_class = _model_class(name, version)
    except (ValueError, KeyError, AttributeError, ImportError):
        return False
    base = R5Resource if version == "R5" else R4BResource
    return isinstance(model_class, type) and issubclass(model_class, base)


def _check_hint(resource_type: str, hint: str | None) -> None:
    if hint is not None and hint != resource_type:
        raise rejected(
            NOT_FHIR,
            "invalid",
            f"The endpoint takes {hint} resources but the payload is a {resource_type}.",
            ["resourceType"],
        )


def _scan(data: Any, limits: Limits, version: FhirVersion) -> list[tuple[_PathLink, object]]:
    """One pass over the decoded JSON: 413 when objects and arrays nest deeper than
    ``limits.max_depth``; otherwise where nested resources (entries, contained) of unknown
    type are, with the type they declare (fhir.resources fails on them with a KeyError instead
    of a validation error).

    Iterative, so that no payload can exhaust the interpreter's recursion limit. One pass
    instead of two (a tenth of ingest's CPU per event went to the two). A node's path is kept as
    a link to its parent's and only spelled out for an issue: most payloads have none. A child's
    depth is checked when it is found, and empty ones are never stacked: they hold nothing to
    look into (the node count, ``_check_node_count``, bounds the rest).
    """
    if limits.max_depth < 1:
        raise _too_deep(limits)
    unknown: list[tuple[_PathLink, object]] = []
    # (link, node, depth, inside a resource of unknown type: not looked into for more)
    stack: list[tuple[_PathLink, Any, int, bool]] = [((None, ""), data, 1, False)]
    while stack:
        link, node, depth, inside_unknown = stack.pop()
        children: Iterable[tuple[str | int, Any]] = (
            node.items() if isinstance(node, dict) else enumerate(node)
        )
        found: list[tuple[_PathLink, Any, int, bool]] = []
        for key, child in children:
            if not isinstance(child, dict | list):
                continue
            if depth + 1 > limits.max_depth:
                raise _too_deep(limits)
            if not child:
                continue
            child_link: _PathLink = (link, key)
            unknown_here = not inside_unknown and _declares_unknown_resource_type(child, version)
            if unknown_here:
                declared = child.get("resourceType") if isinstance(child, dict) else None
                unknown.append((child_link, declared))
            found.append((child_link, child, depth + 1, inside_unknown or unknown_here))
        stack.extend(reversed(found))
    return unknown


def _unknown_type_issue(found: tuple[_PathLink, object], root: str, version: FhirVersion) -> Issue:
    link, name = found
    at = f"{_spelled(link, root)}.resourceType"
    reason = _unreadable_reason(name, version)
    text = f"not an {version} resource type" if reason is None else reason
    return Issue("error", "not-supported", f"{at}: {text}.", (at,))


# (parent link, key): a path from the root, spelled out only when an issue names it.
_PathLink = tuple[Any, str | int]


def _spelled(link: _PathLink, root: str) -> str:
    parts: list[str] = []
    current: _PathLink | None = link
    while current is not None:
        parent, key = current
        if parent is None:
            parts.append(root)
        else:
            parts.append(f"[{key}]" if isinstance(key, int) else f".{key}")
        current = parent
    return "".join(reversed(parts))


def _declares_unknown_resource_type(node: Any, version: FhirVersion) -> bool:
    return (
        isinstance(node, dict)
        and "resourceType" in node
        and not _is_resource_type(node["resourceType"], version)
    )


def _validate_model(
    data: dict[str, Any], resource_type: str, version: FhirVersion, checks: _Checks
) -> Any:
    """The fhir.resources model of the payload. When every error is in entries that can be set
    aside, they are, and the Bundle is validated again without them."""
    model_class = _model_class(resource_type, version)
    model, issues = _model_or_issues(
        model_class, checks.without_failed(data), resource_type, version
    )
    if model is None:
        checks.raise_if_errors(issues)
        again = checks.without_failed(data)
        model, issues = _model_or_issues(model_class, again, resource_type, version)
        if model is None:
            raise rejection(INVALID_FHIR, issues)
    return model


def _model_or_issues(
    model_class: Any, data: dict[str, Any], root: str, version: FhirVersion
) -> tuple[Any, list[Issue]]:
    try:
        return model_class.model_validate(data), []
    except ValidationError as exc:
        return None, [_issue_from_error(error, root) for error in exc.errors()]
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        # fhir.resources raises these for some shapes pydantic does not catch (e.g. a nested
        # resource of unknown type in an unexpected place); located nowhere: the whole payload.
        text = f"The resource is not valid {version}: {type(exc).__name__}."
        return None, [Issue("error", "structure", text)]


def _issue_from_error(error: ErrorDetails, root: str) -> Issue:
    path = fhirpath(root, error["loc"])
    message = _without_input(error["msg"], error.get("input"))
    return Issue("error", _issue_code(error["type"]), f"{path}: {message}", (path,))


def fhirpath(root: str, loc: Sequence[int | str]) -> str:
    """The FHIRPath of a pydantic error location: ``('entry', 0, 'resource')`` -> ``.entry[0]...``.

    Location parts that are not element names (pydantic's union and validator tags) are skipped.
    """
    path = root
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif _FHIR_ELEMENT_NAME.match(part):
            path += "." + _JSON_NAMES.get(part, part)
    return path


def _issue_code(error_type: str) -> str:
    if error_type.endswith("missing"):
        return "required"
    if error_type in ("extra_forbidden", "json_invalid") or error_type.endswith("_type"):
        return "structure"
    return "value"


def _without_input(message: str, value: object) -> str:
    """The message with the offending input value taken out: it may be patient data."""
    if isinstance(value, str | int | float) and not isinstance(value, bool):
        text = str(value)
        if len(text) >= _MIN_SCRUBBED_LENGTH:
            return message.replace(text, "<value>")
    return message


def _raise_if_errors(issues: Sequence[Issue]) -> None:
    if any(issue.is_error for issue in issues):
        raise rejection(INVALID_FHIR, issues)


# --- Bundle ------------------------------------------------------------------------------------


def _bundle_entries(
    bundle: Any, version: FhirVersion, checks: _Checks
) -> tuple[list[ParsedResource], Notification | None]:
    bundle_type = _check_bundle_type(bundle.type, version)
    if bundle_type in NOTIFICATION_BUNDLE_TYPES[version]:
        return _notification_entries(bundle, version)
    needs_request = bundle_type in ("batch", "transaction")
    entries: list[ParsedResource] = []
    issues: list[Issue] = []
    if bundle_type == "message":
        issues.extend(_first_entry_issues(bundle, "MessageHeader", "message"))
    for i, entry in enumerate(bundle.entry or ()):
        if checks.set_aside(i):
            continue
        where = f"Bundle.entry[{i}]"
        issues.extend(_entry_issues(entry, where, needs_request=needs_request))
        if entry.resource is not None:
            entries.append(ParsedResource(entry.resource, f"{where}.resource", entry.fullUrl))
    checks.raise_if_errors(issues)
    return checks.kept(entries), None


def _first_entry_issues(bundle: Any, resource_type: str, bundle_type: str) -> list[Issue]:
    first = (bundle.entry or [None])[0]
    if (
        first is not None
        and first.resource is not None
        and first.resource.get_resource_type() == resource_type
    ):
        return []
    path = "Bundle.entry[0].resource"
    return [
        Issue(
            "error",
            "invalid",
            f"{path}: the first entry of a {bundle_type} Bundle must be a {resource_type}.",
            (path,),
        )
    ]


def _notification_entries(
    bundle: Any, version: FhirVersion
) -> tuple[list[ParsedResource], Notification]:
    """A Subscription notification: its status first (a SubscriptionStatus; in R4 a backport
    Parameters), then full or id-only content."""
    _raise_if_errors(list(_history_entry_issues(bundle)))
    status = _notification_status(bundle, version)
    entries: list[ParsedResource] = []
    carried: set[str] = set()
    named: list[str] = []
    for i, entry in enumerate(bundle.entry[1:], start=1):
        if entry.resource is not None:
            parsed = ParsedResource(entry.resource, f"Bundle.entry[{i}].resource", entry.fullUrl)
            entries.append(parsed)
            carried.update(r for r in (parsed.reference, entry.fullUrl) if r)
        elif entry.fullUrl:
            named.append(entry.fullUrl)
    named.extend(status.foci)
    id_only = tuple(
        dict.fromkeys(r for r in named if r not in carried and not _carried(r, carried))
    )
    return entries, Notification(
        status.type, id_only, status.subscription, status.events_since_start, status.event_numbers
    )


@dataclass(frozen=True)
class _Status:
    """What a notification's first entry says, whichever resource carried it."""

    type: str
    foci: list[str]
    subscription: str | None
    events_since_start: int | None
    event_numbers: tuple[int, ...]


_EVENT_COUNT = re.compile(r"[0-9]{1,19}")


def _event_count(value: object, path: str) -> int | None:
    """An event counter (an integer64, a string in R4 and R4B): None when absent; 422 naming
    the element (never the value) when it is not a whole number of 0 or more."""
    if value is None:
        return None
    text = str(value)
    # ASCII digits only: str.isdigit() takes '²' or Arabic-Indic digits, which int() refuses
    # (or reads), and a counter's value is never echoed to say which.
    if _EVENT_COUNT.fullmatch(text) is None:
        raise rejected(
            INVALID_FHIR,
            "value",
            f"{path} is not an event count (a whole number of 0 or more).",
            [path],
        )
    return int(text)


def _history_entry_issues(bundle: Any) -> Iterator[Issue]:
    """bdl-3 and bdl-4: every entry of a history Bundle (a backport IG notification) carries a
    request and a response (a subscription-notification Bundle may, need not). Only the entry's
    index and the rule are named, never a value."""
    if bundle.type != "history":
        return
    for i, entry in enumerate(bundle.entry or ()):
        for element, rule in (("request", "bdl-3"), ("response", "bdl-4")):
            if getattr(entry, element) is None:
                path = f"Bundle.entry[{i}].{element}"
                yield Issue(
                    "error",
                    "required",
                    f"{path} is required: every entry of a history Bundle has a {element} "
                    f"({rule}; the Subscriptions backport IG's notifications carry them too).",
                    (path,),
                )


def _notification_status(bundle: Any, version: FhirVersion) -> _Status:
    """The notification's type and the focus references of its events, from its first entry:
    an R4B or R5 SubscriptionStatus, or the R4 backport IG's Parameters (R4 has no
    SubscriptionStatus)."""
    bundle_type = str(bundle.type)
    status_type = "Parameters" if version == "R4" else "SubscriptionStatus"
    if version != "R4" and _first_resource_type(bundle) == "Parameters":
        raise _r4_status_not_r4(version)
    _raise_if_errors(_first_entry_issues(bundle, status_type, bundle_type))
    status = bundle.entry[0].resource
    where = "Bundle.entry[0].resource"
    if version == "R4":
        read, issues = r4.notification_status(status, where)
        _raise_if_errors(issues)
        if read.type not in NOTIFICATION_TYPES:
            path = f"{where}.parameter.where(name = 'type').valueCode"
            raise rejected(
                INVALID_FHIR,
                "value",
                f"{path} is not a code of the subscription-notification-type value set.",
                [path],
            )
        return _Status(
            str(read.type),
            [event.focus for event in read.events if event.focus],
            read.subscription,
            _event_count(read.events_since_start, f"{where}.{r4.EVENTS_SINCE_START_PATH}"),
            tuple(
                number
                for i, event in enumerate(read.events)
                if (number := _event_count(event.number, f"{where}.{r4.event_number_path(i)}"))
                is not None
            ),
        )
    _raise_if_errors(list(_coded_element_issues(ParsedResource(status, where))))
    if status.type is None:
        path = f"{where}.type"
        raise rejected(INVALID_FHIR, "required", f"{path} is required.", [path])
    events = status.notificationEvent or ()
    return _Status(
        str(status.type),
        [
            event.focus.reference
            for event in events
            if event.focus is not None and event.focus.reference
        ],
        status.subscription.reference if status.subscription is not None else None,
        _event_count(status.eventsSinceSubscriptionStart, f"{where}.eventsSinceSubscriptionStart"),
        tuple(
            number
            for i, event in enumerate(events)
            if (
                number := _event_count(
                    event.eventNumber, f"{where}.notificationEvent[{i}].eventNumber"
                )
            )
            is not None
        ),
    )


def _first_resource_type(bundle: Any) -> str | None:
    first = (bundle.entry or [None])[0]
    if first is None or first.resource is None:
        return None
    return str(first.resource.get_resource_type())


def _r4_status_not_r4(version: FhirVersion) -> FhirRejected:
    """A notification whose status is the backport IG's R4 Parameters, read as another version
    (usually: sent without ``fhirVersion``, so read as the default R4B)."""
    path = "Bundle.entry[0].resource"
    release = "R5 (fhirVersion=5.0)" if version == "R5" else "R4B (fhirVersion 4.3, the default)"
    return rejected(
        INVALID_FHIR,
        "invalid",
        f"{path} is a Parameters: the Subscriptions backport IG's R4 notification status "
        f"(backport-subscription-status-r4), but the payload was read as {release}, whose "
        "notifications start with a SubscriptionStatus. Send an R4 notification with "
        "'Content-Type: application/fhir+json; fhirVersion=4.0' (on the inbound topic, a "
        "content-type header saying so), or configure the source's fhir_version as R4; or send "
        f"a SubscriptionStatus first as {version}.",
        [path],
    )


def _carried(reference: str, carried: set[str]) -> bool:
    """Whether an absolute reference names a resource carried as ``Type/id``."""
    match = _LITERAL_REFERENCE.search(reference)
    return match is not None and match.group(0).lstrip("/") in {
        c.split("/_history/")[0] for c in carried
    }


def _check_bundle_type(bundle_type: str | None, version: FhirVersion) -> str:
    if bundle_type is None:
        raise rejected(INVALID_FHIR, "required", "Bundle.type is required.", ["Bundle.type"])
    known = BUNDLE_TYPES_BY_VERSION[version]
    if bundle_type not in known:
        raise rejected(
            INVALID_FHIR,
            "value",
            f"Bundle.type is not a code of the {version} bundle-type value set.",
            ["Bundle.type"],
        )
    accepted = (*ACCEPTED_BUNDLE_TYPES, *sorted(NOTIFICATION_BUNDLE_TYPES[version]))
    if bundle_type not in accepted:
        raise rejected(
            INVALID_FHIR,
            "not-supported",
            f"Bundle.type {bundle_type} is not accepted: ingest takes "
            f"{', '.join(accepted)} bundles.",
            ["Bundle.type"],
        )
    return bundle_type


def _entry_issues(entry: Any, where: str, *, needs_request: bool) -> Iterator[Issue]:
    if entry.resource is None:
        path = f"{where}.resource"
        yield Issue("error", "required", f"{path} is required: ingest takes resources.", (path,))
    if entry.request is None:
        if needs_request:
            path = f"{where}.request"
            yield Issue(
                "error",
                "required",
                f"{path} is required in batch and transaction bundles.",
                (path,),
            )
    elif entry.request.method not in HTTP_VERBS:
        path = f"{where}.request.method"
        yield Issue(
            "error", "value", f"{path} is not a code of the R4B http-verb value set.", (path,)
        )


# --- our own checks ----------------------------------------------------------------------------


def _coded_element_issues(entry: ParsedResource) -> Iterator[Issue]:
    for element, allowed, value_set in _CODED_ELEMENTS.get(entry.resource_type, ()):
        code = getattr(entry.resource, element)
        if code is not None and code not in allowed:
            path = f"{entry.expression}.{element}"
            yield Issue(
                "error",
                "value",
                f"{path} is not a code of the R4B {value_set} value set.",
                (path,),
            )


def _resolve_references(
    entries: Sequence[ParsedResource], checks: _Checks, set_aside: frozenset[str]
) -> list[ParsedResource]:
    """The entries with their subject and encounter references resolved (urn:uuid references
    to other entries of the Bundle); ``set_aside``: fullUrls of entries of a batch set aside."""
    by_full_url = {entry.full_url: entry for entry in entries if entry.full_url}
    resolved: list[ParsedResource] = []
    issues: list[Issue] = []
    for entry in entries:
        references: dict[str, str | None] = {}
        for element, target_type in _REFERENCE_ELEMENTS.get(entry.resource_type, ()):
            reference, problems = _resolve_reference(
                entry, element, target_type, by_full_url, set_aside
            )
            references[f"{element}_reference"] = reference
            issues.extend(problems)
        resolved.append(
            ParsedResource(
                entry.resource,
                entry.expression,
                entry.full_url,
                subject_reference=references.get("subject_reference"),
                encounter_reference=references.get("encounter_reference"),
            )
        )
    checks.raise_if_errors(issues)
    return resolved


def _resolve_reference(
    entry: ParsedResource,
    element: str,
    target_type: str,
    by_full_url: Mapping[str, ParsedResource],
    set_aside: frozenset[str] = frozenset(),
) -> tuple[str | None, list[Issue]]:
    """The reference in ``element`` as used downstream, checked to target ``target_type``.

    None when the element is absent or holds no literal reference (identifier only, or a
    contained resource, which nothing outside the payload can refer to).
    """
    reference = getattr(entry.resource, element)
    if reference is None:
        return None, []
    path = f"{entry.expression}.{element}"
    literal = reference.reference
    if literal is None:
        found_type, usable = reference.type, None
    elif literal.startswith("urn:"):
        target = by_full_url.get(literal)
        if target is None:
            problem = (
                "resolves to an entry of the batch that was not accepted"
                if literal in set_aside
                else "does not resolve to an entry of the Bundle"
            )
            issue = Issue("error", "invalid", f"{path}: the urn reference {problem}.", (path,))
            return None, [issue]
        if not target.resource.id:
            # The server names such a resource when it stores it; a report could only repeat
            # the urn, which means nothing outside this Bundle (found by the e2e fuzzing).
            issue = Issue(
                "error",
                "invalid",
                f"{path}: the urn reference resolves to an entry without an id, which a report "
                f"could not name; give the {target.resource_type} an id.",
                (path,),
            )
            return None, [issue]
        found_type, usable = target.resource_type, target.reference
    elif literal.startswith("#"):
        found_type, usable = _contained_type(entry.resource, literal[1:]), None
    else:
        match = _LITERAL_REFERENCE.search(literal)
        found_type, usable = (match["type"] if match else None), literal
    if reference.type not in (None, target_type) or found_type not in (None, target_type):
        issue = Issue("error", "invalid", f"{path} must reference a {target_type}.", (path,))
        return None, [issue]
    if literal is not None and found_type is None:
        issue = Issue(
            "error", "invalid", f"{path} is not a resolvable {target_type} reference.", (path,)
        )
        return None, [issue]
    return usable, []


def _contained_type(resource: Any, local_id: str) -> str | None:
    for contained in resource.contained or ():
        if contained.id == local_id:
            return str(contained.get_resource_type())
    return None
