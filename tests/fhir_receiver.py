"""A small FHIR server for tests: transaction Bundles with conditional create, in memory.

No runnable FHIR server could be had from the registries this machine reaches (Maven Central has
HAPI FHIR's libraries, but no runnable server jar: hapi-fhir-cli's ``run-server`` is gone, and the
JPA server starter is published as source and container only), so delivery is tested against this.

It implements what medmesh's delivery uses, as HAPI FHIR does: ``POST [base]`` with a Bundle of
type transaction, each entry ``POST`` with ``ifNoneExist: identifier=system|value`` (an existing
match is kept, 200) or ``PUT Type/id`` (create or update); ``urn:uuid`` references are rewritten to
the ids it assigned; the answer is a transaction-response Bundle. Use it as an httpx transport
(``httpx.MockTransport(receiver)``). ``down_for`` answers the next requests with 503 (or a
connection error); ``reject_when`` answers 422 with an OperationOutcome.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

import httpx

JsonDict = dict[str, Any]


@dataclass
class FhirTestServer:
    """An in-memory FHIR server answering transactions."""

    resources: dict[str, dict[str, JsonDict]] = field(default_factory=dict)
    requests: int = 0
    down_for: int = 0
    down_as_connection_error: bool = False
    reject_when: Callable[[JsonDict], str | None] = lambda _bundle: None
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def __call__(self, request: httpx.Request) -> httpx.Response:
        """Answer one HTTP request."""
        self.requests += 1
        if self.down_for > 0:
            self.down_for -= 1
            if self.down_as_connection_error:
                raise httpx.ConnectError("connection refused", request=request)
            return httpx.Response(503, text="down for maintenance")
        if request.method != "POST":
            return _outcome(405, "not-supported", f"{request.method} is not supported here")
        try:
            bundle = json.loads(request.content)
        except ValueError:
            return _outcome(400, "structure", "the body is not JSON")
        if bundle.get("resourceType") != "Bundle" or bundle.get("type") != "transaction":
            return _outcome(400, "structure", "expected a Bundle of type transaction")
        problem = self.reject_when(bundle)
        if problem:
            return _outcome(422, "processing", problem)
        return httpx.Response(200, json=self._transaction(bundle))

    def of_type(self, kind: str) -> list[JsonDict]:
        """Every stored resource of one type."""
        return list(self.resources.get(kind, {}).values())

    def _transaction(self, bundle: JsonDict) -> JsonDict:
        assigned: dict[str, str] = {}
        plans = []
        for entry in bundle["entry"]:
            resource, request = entry["resource"], entry["request"]
            kind = resource["resourceType"]
            if request["method"] == "POST":
                existing = self._match(kind, request.get("ifNoneExist"))
                if existing is not None:
                    plans.append((entry, f"{kind}/{existing}", "200 OK", False))
                else:
                    plans.append((entry, f"{kind}/{next(self._ids)}", "201 Created", True))
            else:
                target = request["url"]
                status = "200 OK" if self._get(target) else "201 Created"
                plans.append((entry, target, status, True))
            assigned[entry["fullUrl"]] = plans[-1][1]
        responses = []
        for entry, location, status, write in plans:
            if write:
                kind, resource_id = location.split("/")
                stored = _rewrite(entry["resource"], assigned) | {"id": resource_id}
                self.resources.setdefault(kind, {})[resource_id] = stored
            responses.append({"response": {"status": status, "location": location}})
        return {"resourceType": "Bundle", "type": "transaction-response", "entry": responses}

    def _match(self, kind: str, condition: str | None) -> str | None:
        if not condition or not condition.startswith("identifier="):
            return None
        system, _, value = unquote(condition.removeprefix("identifier=")).partition("|")
        for resource_id, resource in self.resources.get(kind, {}).items():
            for identifier in resource.get("identifier", []):
                if identifier.get("system") == system and identifier.get("value") == value:
                    return resource_id
        return None

    def _get(self, location: str) -> JsonDict | None:
        kind, _, resource_id = location.partition("/")
        return self.resources.get(kind, {}).get(resource_id)


def _rewrite(node: Any, assigned: dict[str, str]) -> Any:
    if isinstance(node, dict):
        return {
            k: assigned.get(v, v)
            if k == "reference" and isinstance(v, str)
            else _rewrite(v, assigned)
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [_rewrite(v, assigned) for v in node]
    return node


def _outcome(status: int, code: str, diagnostics: str) -> httpx.Response:
    return httpx.Response(
        status,
        json={
            "resourceType": "OperationOutcome",
            "issue": [{"severity": "error", "code": code, "diagnostics": diagnostics}],
        },
    )
