"""What ingest answers a POST that sent inference requests, per the payload's Bundle.type.

Since issue 18 item 2 a batch or transaction Bundle is answered as FHIR's http.html says: 200
with a batch-response / transaction-response Bundle, one entry per request entry, each entry
that fed a request ``202 Accepted`` with an outcome naming it (model, correlation id). Any other
payload (a collection, a message, a notification, one resource) is still answered 202 with an
OperationOutcome naming the requests. In both, the ``medmesh-correlation-id`` header lists them.
"""

from __future__ import annotations

import json
import re
from typing import Any

import httpx

from medmesh_contracts import headers as h

RESPONSE_BUNDLES = ("batch", "transaction")
# "<model> request <correlation id>", as ingest's outcomes name a request it sent.
_NAMED_REQUEST = re.compile(r"([A-Za-z0-9_.-]+) request ([0-9a-f-]{36})")


def bundle_type(payload: bytes) -> str | None:
    """The payload's Bundle.type, or None when it is not a Bundle."""
    data: dict[str, Any] = json.loads(payload)
    kind = data.get("type")
    return kind if data.get("resourceType") == "Bundle" and isinstance(kind, str) else None


def expected_status(payload: bytes) -> int:
    """The HTTP status of a POST of ``payload`` that sends a request: 200 for a batch or
    transaction (its response Bundle), 202 otherwise (an OperationOutcome)."""
    return 200 if bundle_type(payload) in RESPONSE_BUNDLES else 202


def requests_sent(response: httpx.Response, payload: bytes) -> dict[str, str]:
    """Assert the answer to ``payload`` is the one for a payload that sent requests; returns
    each request's model by correlation id: exactly the ids of the header, each named.

    A batch or transaction: 200, a ``<type>-response`` Bundle with one entry per request entry,
    the requests named in the outcomes of entries answered ``202 Accepted``. Otherwise: 202 and
    an OperationOutcome naming them.
    """
    body: dict[str, Any] = response.json()
    kind = bundle_type(payload)
    if kind in RESPONSE_BUNDLES:
        assert response.status_code == 200, response.text
        assert (body["resourceType"], body["type"]) == ("Bundle", f"{kind}-response"), body
        entries = body.get("entry", [])
        assert len(entries) == len(json.loads(payload).get("entry", [])), body
        named = json.dumps(
            [
                e["response"].get("outcome")
                for e in entries
                if e["response"]["status"] == "202 Accepted"
            ]
        )
    else:
        assert response.status_code == 202, response.text
        assert body["resourceType"] == "OperationOutcome", body
        named = " ".join(i.get("diagnostics", "") for i in body["issue"])
    models = {correlation_id: model for model, correlation_id in _NAMED_REQUEST.findall(named)}
    header = [i for i in response.headers.get(h.CORRELATION_ID, "").split(",") if i]
    assert header, f"no {h.CORRELATION_ID} header: {response.text}"
    assert sorted(models) == sorted(header), (header, body)
    return models
