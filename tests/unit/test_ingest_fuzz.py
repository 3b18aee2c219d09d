"""Property-based fuzzing of IngestService.handle in process, and the input strategies that
tests/e2e/test_ingest_fuzz.py sends to the running stack."""

from __future__ import annotations

import asyncio
import copy
import json
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medmesh_contracts.events import (
    PatientReadingsUpdated,
    Producer,
    SourceContext,
)
from medmesh_contracts.modelspec import load_specs
from medmesh_ingest.pseudonym import Pseudonymizer
from medmesh_ingest.readings import ReadingsStore
from medmesh_ingest.service import Context, IngestService, Outgoing
from medmesh_ingest.validation import FhirVersion, Limits

SPECS = load_specs(Path(__file__).parents[2] / "deploy" / "models")
RECEIVED = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
FIXTURES = Path(__file__).parents[1] / "fixtures" / "fhir"
# The fixtures with their patients renamed, so that fuzzing never touches the readings state of
# the patients other tests send (a re-sent reading is a duplicate and gets no new request).
SEEDS = [
    json.loads(
        (FIXTURES / name)
        .read_text()
        .replace('"example-', '"fuzz-example-')
        .replace("/example-", "/fuzz-example-")
    )
    for name in (
        "vitals-bundle-high.json",
        "observation-heart-rate.json",
        "subscription-event-full.json",
        "subscription-heartbeat.json",
        "message-bundle.json",
        "transaction-bundle.json",
        "service-request-order.json",
        "one-by-one/bp.json",
    )
]
LOINC = ["9279-1", "59408-5", "2708-6", "3151-8", "3150-0", "8310-5", "8480-6", "8867-4", "67775-7"]
UNITS = ["/min", "%", "Cel", "[degF]", "K", "mm[Hg]", "kPa", "L/min", "kg", "bpm", "{x", "", "1"]
CONTENT_TYPES = [
    "application/fhir+json",
    "application/json",
    "application/fhir+json; fhirVersion=4.3",
    "application/fhir+json; fhirVersion=5.0",
    "application/fhir+json; fhirVersion=9.9",
    "text/plain",
]

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(10**20), 10**20)
    | st.floats(allow_nan=False)
    | st.text(max_size=12),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=8,
)


@st.composite
def observations(draw: st.DrawFn) -> dict[str, Any]:
    """A vital-sign Observation with values, units, codes and statuses good and bad."""
    resource: dict[str, Any] = {
        "resourceType": "Observation",
        "id": f"fuzz-{draw(st.integers(0, 50))}",
        "status": draw(st.sampled_from(["final", "amended", "bogus", "entered-in-error"])),
        "code": {"coding": [{"system": "http://loinc.org", "code": draw(st.sampled_from(LOINC))}]},
        "subject": {"reference": f"Patient/fuzz-{draw(st.integers(0, 20))}"},
        "effectiveDateTime": draw(
            st.sampled_from(["2026-11-23T08:00:00+00:00", "2026-11-23", "2026-11-23T08:00:00", "x"])
        ),
    }
    value = draw(st.floats(-1e6, 1e6, allow_nan=False) | st.integers(-500, 500))
    resource["valueQuantity"] = {
        "value": value,
        "system": draw(st.sampled_from(["http://unitsofmeasure.org", "http://example.org"])),
        "code": draw(st.sampled_from(UNITS) | st.text(max_size=6)),
    }
    if draw(st.booleans()):
        resource["meta"] = {"versionId": str(draw(st.integers(1, 3)))}
    return resource


@st.composite
def mutated_seeds(draw: st.DrawFn) -> Any:
    """A realistic fixture with one element replaced, removed or retyped somewhere inside."""
    document = copy.deepcopy(draw(st.sampled_from(SEEDS)))
    node: Any = document
    for _ in range(draw(st.integers(1, 6))):
        children = list(node.items()) if isinstance(node, dict) else list(enumerate(node))
        containers = [(k, v) for k, v in children if isinstance(v, dict | list) and v]
        if not containers or draw(st.booleans()):
            break
        _key, node = draw(st.sampled_from(containers))
    if isinstance(node, dict) and node:
        key = draw(st.sampled_from(sorted(node)))
        if draw(st.booleans()):
            node[key] = draw(json_values)
        else:
            del node[key]
    elif isinstance(node, list) and node:
        node[draw(st.integers(0, len(node) - 1))] = draw(json_values)
    return document


def _as_bytes(value: Any) -> bytes:
    return value if isinstance(value, bytes) else json.dumps(value).encode()


payloads = st.one_of(
    st.binary(max_size=64),
    json_values.map(_as_bytes),
    observations().map(_as_bytes),
    mutated_seeds().map(_as_bytes),
    st.integers(1, 60).map(lambda depth: b"[" * depth * 10 + b"]" * depth * 10),
)


def _service() -> IngestService:
    async def ignore(events: Sequence[Outgoing] | Sequence[PatientReadingsUpdated]) -> list[None]:
        return [None] * len(events)

    return IngestService(
        specs=SPECS,
        pseudonymize=Pseudonymizer(b"0123456789abcdef0123"),
        producer=Producer(service="ingest", instance="fuzz"),
        store=ReadingsStore(),
        publish_requests=ignore,
        publish_states=ignore,
        limits=Limits(),
        lookback=timedelta(hours=4),
    )


SERVICE = _service()


@settings(max_examples=1500, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(body=payloads, version=st.sampled_from(["R4B", "R5"]))
def test_any_payload_gets_an_answer_below_500(body: bytes, version: FhirVersion) -> None:
    """Whatever the bytes, handle() answers 2xx or 4xx with an OperationOutcome, never raises."""
    context = Context(SourceContext(channel="http", fhir_version=version), version)
    answer = asyncio.run(SERVICE.handle(body, context, RECEIVED))
    assert 200 <= answer.status < 500
    assert answer.operation_outcome["resourceType"] == "OperationOutcome"
