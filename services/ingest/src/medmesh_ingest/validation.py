"""Parsing and checking inbound FHIR R4B payloads, before anything is extracted from them.

``parse_payload`` turns raw bytes into the resources to consider, or raises ``FhirRejected``
with an OperationOutcome. fhir.resources checks structure and datatypes; it does not check code
values, reference target types or Bundle types, so the rules of BRIEF.md section 5 are made here.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fhir.resources.R4B import get_fhir_model_class
from fhir.resources.R4B.resource import Resource
from pydantic import ValidationError
from pydantic_core import ErrorDetails

from medmesh_ingest.outcomes import INVALID_FHIR, NOT_FHIR, Issue, rejected, rejection

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
HTTP_VERBS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH"})

ACCEPTED_BUNDLE_TYPES = ("collection", "batch", "transaction")

# Coded elements checked per resource type: (element, allowed codes, value set name).
_CODED_ELEMENTS: Mapping[str, tuple[tuple[str, frozenset[str], str], ...]] = {
    "Observation": (("status", OBSERVATION_STATUSES, "observation-status"),),
    "ServiceRequest": (
        ("status", REQUEST_STATUSES, "request-status"),
        ("intent", REQUEST_INTENTS, "request-intent"),
    ),
}
# Reference elements checked per resource type: (element, the resource type it must target).
_REFERENCE_ELEMENTS: Mapping[str, tuple[tuple[str, str], ...]] = {
    "Observation": (("subject", "Patient"), ("encounter", "Encounter")),
}

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


def parse_payload(raw: bytes, resource_type_hint: str | None = None) -> list[ParsedResource]:
    """The resources of a payload: the resource itself, or the entries of a Bundle.

    ``resource_type_hint`` is the type named by the endpoint (``POST /fhir/{resourceType}``).
    Raises ``FhirRejected``: 400 when the payload is not JSON, not a FHIR resource, or not of
    the hinted type; 422 when it is FHIR but invalid or not usable.
    """
    data = _decode_json(raw)
    resource_type = _resource_type_of(data)
    _check_hint(resource_type, resource_type_hint)
    _raise_if_errors(list(_unknown_nested_resource_types(data, resource_type)))
    model = _validate_model(data, resource_type)
    if resource_type == "Bundle":
        entries = _bundle_entries(model)
    else:
        entries = [ParsedResource(model, resource_type)]
    _raise_if_errors([issue for entry in entries for issue in _coded_element_issues(entry)])
    return _resolve_references(entries)


# --- decoding ----------------------------------------------------------------------------------


def _decode_json(raw: bytes) -> dict[str, Any]:
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise rejected(NOT_FHIR, "structure", "The payload is not JSON.") from None
    if not isinstance(data, dict):
        raise rejected(NOT_FHIR, "structure", "The payload is not a JSON object.")
    return data


def _resource_type_of(data: Mapping[str, Any]) -> str:
    resource_type = data.get("resourceType")
    if not isinstance(resource_type, str):
        raise rejected(
            NOT_FHIR, "structure", "The payload is not a FHIR resource: no resourceType."
        )
    if not _is_resource_type(resource_type):
        raise rejected(
            NOT_FHIR,
            "not-supported",
            "The payload is not a FHIR resource: resourceType is not an R4B resource type.",
            ["resourceType"],
        )
    return resource_type


def _is_resource_type(name: object) -> bool:
    if not isinstance(name, str) or not _RESOURCE_TYPE_NAME.match(name):
        return False
    if name in ("Resource", "DomainResource"):  # abstract
        return False
    try:
        model_class = get_fhir_model_class(name)
    except ValueError:
        return False
    return issubclass(model_class, Resource)


def _check_hint(resource_type: str, hint: str | None) -> None:
    if hint is not None and hint != resource_type:
        raise rejected(
            NOT_FHIR,
            "invalid",
            f"The endpoint takes {hint} resources but the payload is a {resource_type}.",
            ["resourceType"],
        )


def _unknown_nested_resource_types(node: Any, path: str) -> Iterator[Issue]:
    """Issues for nested resources (entries, contained) of unknown type.

    fhir.resources fails on them with a KeyError instead of a validation error.
    """
    children: Iterator[tuple[str, Any]]
    if isinstance(node, dict):
        children = ((f"{path}.{key}", value) for key, value in node.items())
    elif isinstance(node, list):
        children = ((f"{path}[{i}]", value) for i, value in enumerate(node))
    else:
        return
    for child_path, child in children:
        if _declares_unknown_resource_type(child):
            where = f"{child_path}.resourceType"
            yield Issue("error", "not-supported", f"{where}: not an R4B resource type.", (where,))
        else:
            yield from _unknown_nested_resource_types(child, child_path)


def _declares_unknown_resource_type(node: Any) -> bool:
    return (
        isinstance(node, dict)
        and "resourceType" in node
        and not _is_resource_type(node["resourceType"])
    )


def _validate_model(data: dict[str, Any], resource_type: str) -> Any:
    model_class = get_fhir_model_class(resource_type)
    try:
        return model_class.model_validate(data)
    except ValidationError as exc:
        issues = [_issue_from_error(error, resource_type) for error in exc.errors()]
        raise rejection(INVALID_FHIR, issues) from None


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


def _bundle_entries(bundle: Any) -> list[ParsedResource]:
    _check_bundle_type(bundle.type)
    needs_request = bundle.type in ("batch", "transaction")
    entries: list[ParsedResource] = []
    issues: list[Issue] = []
    for i, entry in enumerate(bundle.entry or ()):
        where = f"Bundle.entry[{i}]"
        issues.extend(_entry_issues(entry, where, needs_request=needs_request))
        if entry.resource is not None:
            entries.append(ParsedResource(entry.resource, f"{where}.resource", entry.fullUrl))
    _raise_if_errors(issues)
    return entries


def _check_bundle_type(bundle_type: str | None) -> None:
    if bundle_type is None:
        raise rejected(INVALID_FHIR, "required", "Bundle.type is required.", ["Bundle.type"])
    if bundle_type not in BUNDLE_TYPES:
        raise rejected(
            INVALID_FHIR,
            "value",
            "Bundle.type is not a code of the R4B bundle-type value set.",
            ["Bundle.type"],
        )
    if bundle_type not in ACCEPTED_BUNDLE_TYPES:
        raise rejected(
            INVALID_FHIR,
            "not-supported",
            f"Bundle.type {bundle_type} is not accepted: ingest takes "
            f"{', '.join(ACCEPTED_BUNDLE_TYPES)} bundles.",
            ["Bundle.type"],
        )


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


def _resolve_references(entries: Sequence[ParsedResource]) -> list[ParsedResource]:
    by_full_url = {entry.full_url: entry for entry in entries if entry.full_url}
    resolved: list[ParsedResource] = []
    issues: list[Issue] = []
    for entry in entries:
        references: dict[str, str | None] = {}
        for element, target_type in _REFERENCE_ELEMENTS.get(entry.resource_type, ()):
            reference, problems = _resolve_reference(entry, element, target_type, by_full_url)
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
    _raise_if_errors(issues)
    return resolved


def _resolve_reference(
    entry: ParsedResource,
    element: str,
    target_type: str,
    by_full_url: Mapping[str, ParsedResource],
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
            issue = Issue(
                "error",
                "invalid",
                f"{path}: the urn reference does not resolve to an entry of the Bundle.",
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
