"""Property-based fuzzing of IngestService.handle in process, and the input strategies that
tests/e2e/test_ingest_fuzz.py sends to the running stack.

The short form (1500 examples) runs with the unit tests; MEDMESH_FUZZ_EXAMPLES asks for more.
Inputs include the ECG fixtures (mutated like the others) and generated waveforms (SampledData
with hostile periods, intervals, units, origins, factors and points)."""

from __future__ import annotations

import asyncio
import copy
import json
import os
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medmesh_contracts.events import (
    FhirVersion,
    PatientReadingsUpdated,
    Producer,
    SourceContext,
)
from medmesh_contracts.modelspec import load_specs
from medmesh_ingest.pseudonym import Pseudonymizer
from medmesh_ingest.readings import ReadingsStore
from medmesh_ingest.service import Context, IngestService, Outgoing
from medmesh_ingest.validation import Limits

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
        "r4-subscription-event-full.json",
        "message-bundle.json",
        "transaction-bundle.json",
        "service-request-order.json",
        "one-by-one/bp.json",
        "ecg-sinus.json",
        "ecg-af-r5.json",
    )
]
LOINC = ["9279-1", "59408-5", "2708-6", "3151-8", "3150-0", "8310-5", "8480-6", "8867-4", "67775-7"]
UNITS = ["/min", "%", "Cel", "[degF]", "K", "mm[Hg]", "kPa", "L/min", "kg", "bpm", "{x", "", "1"]
CONTENT_TYPES = [
    "application/fhir+json",
    "application/json",
    "application/fhir+json; fhirVersion=4.0",
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


MDC = "urn:oid:2.16.840.1.113883.6.24"
WAVEFORM_UNITS = ["mV", "uV", "V", "GV", "mm[Hg]", "kg", "{x", ""]
TIME_UNITS = ["ms", "s", "min", "h", "a", "us", "kg", "{x"]
# Points as a sender may write them: decimals (huge and tiny too), gaps, limits and garbage.
POINTS = ["0", "1", "-1", "12.5", "-480", "1e308", "-1e308", "1e-320", "E", "L", "U", "x", "1e999"]
extreme_numbers = st.sampled_from([0, 1, -1, 2.5, 1e-300, 1e300, 1e308, -1e308]) | st.floats(
    -1e12, 1e12, allow_nan=False, allow_infinity=False
)


@st.composite
def waveforms(draw: st.DrawFn) -> dict[str, Any]:
    """An ECG lead II Observation (alone or as a component) whose SampledData is drawn from
    plausible and hostile shapes: R4B period or R5 interval (seconds to hours between points,
    or far below a microsecond), units of every dimension, huge origins, factors and limits,
    E/L/U points, several dimensions, up to 6000 points."""
    sampled: dict[str, Any] = {
        "origin": {
            "value": draw(extreme_numbers),
            "system": "http://unitsofmeasure.org",
            "code": draw(st.sampled_from(WAVEFORM_UNITS)),
        },
        "dimensions": draw(st.sampled_from([1, 1, 1, 2])),
    }
    spacing = draw(
        st.sampled_from([0.000001, 1, 2, 4, 40, 41, 1000, 20_000, 14_400_000, 1e300])
        | st.floats(1e-6, 1e9, allow_nan=False, allow_infinity=False)
    )
    if draw(st.booleans()):
        sampled["period"] = spacing
    else:
        sampled["interval"] = spacing
        sampled["intervalUnit"] = draw(st.sampled_from(TIME_UNITS))
    for element in ("factor", "lowerLimit", "upperLimit"):
        if draw(st.booleans()):
            sampled[element] = draw(extreme_numbers)
    pattern = draw(st.lists(st.sampled_from(POINTS), min_size=1, max_size=12))
    count = draw(st.sampled_from([0, 1, 2, 3, 2000, 2500, 5000, 6000]) | st.integers(0, 3000))
    if count:
        sampled["data"] = " ".join((pattern * (count // len(pattern) + 1))[:count])
    lead = {"coding": [{"system": MDC, "code": "131330"}]}
    resource: dict[str, Any] = {
        "resourceType": "Observation",
        "id": f"fuzz-ecg-{draw(st.integers(0, 20))}",
        "status": "final",
        "subject": {"reference": f"Patient/fuzz-ecg-{draw(st.integers(0, 20))}"},
        "effectiveDateTime": "2026-11-23T08:00:00+00:00",
    }
    if draw(st.booleans()):
        resource |= {"code": lead, "valueSampledData": sampled}
    else:
        resource["code"] = {"coding": [{"system": MDC, "code": "131328"}]}
        resource["component"] = [{"code": lead, "valueSampledData": sampled}]
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
    waveforms().map(_as_bytes),
    mutated_seeds().map(_as_bytes),
    st.integers(1, 60).map(lambda depth: b"[" * depth * 10 + b"]" * depth * 10),
)


def _service() -> IngestService:
    async def ignore(
        requests: Sequence[Outgoing], states: Sequence[PatientReadingsUpdated], payloads: int
    ) -> list[int | None]:
        return [None] * len(states)

    return IngestService(
        specs=SPECS,
        pseudonymize=Pseudonymizer(b"0123456789abcdef0123"),
        producer=Producer(service="ingest", instance="fuzz"),
        store=ReadingsStore(),
        publish=ignore,
        limits=Limits(),
        lookback=timedelta(hours=4),
    )


SERVICE = _service()


FUZZ_EXAMPLES = int(os.environ.get("MEDMESH_FUZZ_EXAMPLES", "1500"))


@settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
@given(body=payloads, version=st.sampled_from(["R4B", "R5"]))
def test_any_payload_gets_an_answer_below_500(body: bytes, version: FhirVersion) -> None:
    """Whatever the bytes, handle() answers 2xx or 4xx with an OperationOutcome, never raises."""
    context = Context(SourceContext(channel="http", fhir_version=version), version)
    answer = asyncio.run(SERVICE.handle(body, context, RECEIVED))
    assert 200 <= answer.status < 500
    assert answer.operation_outcome["resourceType"] == "OperationOutcome"
