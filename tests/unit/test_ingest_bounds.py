"""Bounded work per input (issue 16, item 1): no single payload makes ingest resample, convert or
walk without bound; implausible and non-finite signals and values are OperationOutcomes."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from medmesh_contracts.events import FhirVersion, PatientReadingsUpdated, Producer, SourceContext
from medmesh_contracts.modelspec import ModelSpec, load_specs, parse_spec
from medmesh_ingest.extraction import extract
from medmesh_ingest.outcomes import INVALID_FHIR, TOO_LARGE, FhirRejected
from medmesh_ingest.pseudonym import Pseudonymizer
from medmesh_ingest.readings import ReadingsStore
from medmesh_ingest.service import Answer, Context, IngestService, Outgoing
from medmesh_ingest.settings import IngestSettings
from medmesh_ingest.validation import Limits, parse

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "fhir"
SPECS = load_specs(ROOT / "deploy" / "models")
RECEIVED = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
MDC = "urn:oid:2.16.840.1.113883.6.24"
UCUM = "http://unitsofmeasure.org"
LEAD = "Bundle.entry[1].resource.component[0].valueSampledData"
# Generous: each case takes milliseconds once bounded; on unbounded code they took minutes.
bounded = pytest.mark.timeout(60)
DEFAULTS = Limits()


def _service(limits: Limits) -> IngestService:
    async def ignore(
        requests: Sequence[Outgoing], states: Sequence[PatientReadingsUpdated], payloads: int
    ) -> list[int | None]:
        return [None] * len(states)

    return IngestService(
        specs=SPECS,
        pseudonymize=Pseudonymizer(b"0123456789abcdef0123"),
        producer=Producer(service="ingest", instance="bounds"),
        store=ReadingsStore(),
        publish=ignore,
        limits=limits,
        lookback=timedelta(hours=4),
    )


def _handle(body: Any, version: FhirVersion = "R4B", limits: Limits = DEFAULTS) -> Answer:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    context = Context(SourceContext(channel="http", fhir_version=version), version)
    return asyncio.run(_service(limits).handle(raw, context, RECEIVED))


def _only_issue(answer: Answer) -> dict[str, Any]:
    (issue,) = answer.operation_outcome["issue"]
    assert isinstance(issue, dict)
    return issue


def _ecg_bundle(**sampled_data: Any) -> dict[str, Any]:
    """The R4B sinus ECG fixture (5000 points, 2 ms apart) with its lead's SampledData changed."""
    bundle: dict[str, Any] = json.loads((FIXTURES / "ecg-sinus.json").read_text())
    lead = bundle["entry"][1]["resource"]["component"][0]["valueSampledData"]
    lead.update(sampled_data)
    return bundle


def _lead_ii(sampled_data: dict[str, Any]) -> dict[str, Any]:
    """A lead II Observation (MDC 131330) carrying the SampledData."""
    return {
        "resourceType": "Observation",
        "id": "bounds-lead",
        "status": "final",
        "code": {"coding": [{"system": MDC, "code": "131330"}]},
        "subject": {"reference": "Patient/bounds"},
        "effectiveDateTime": "2026-11-23T08:00:00+00:00",
        "valueSampledData": sampled_data,
    }


# --- waveforms: how long a signal lasts, how slowly it is sampled --------------------------------


@bounded
def test_an_ecg_bundle_sampled_every_20_s_is_413_naming_its_period() -> None:
    """The 18 kB ECG Bundle with period 20 s (5000 points: 28 h) is 413 at its period."""
    answer = _handle(_ecg_bundle(period=20_000))
    assert answer.status == TOO_LARGE
    issue = _only_issue(answer)
    assert issue["code"] == "too-costly"
    assert issue["expression"] == [f"{LEAD}.period"]
    assert "MEDMESH_MAX_WAVEFORM_SECONDS" in issue["diagnostics"]


@bounded
def test_a_period_too_long_for_the_model_rate_is_422_even_without_the_duration_limit() -> None:
    """With the duration limit lifted, the 20 s period is 422 at the period: at 250 Hz at most
    40 ms between points is usable (the resampling is never run over 28 hours)."""
    answer = _handle(_ecg_bundle(period=20_000), limits=Limits(max_waveform_seconds=1e12))
    assert answer.status == INVALID_FHIR
    issue = _only_issue(answer)
    assert (issue["severity"], issue["code"]) == ("error", "value")
    assert issue["expression"] == [f"{LEAD}.period"]
    assert "at most 40 ms" in issue["diagnostics"]


@bounded
def test_a_two_point_r5_observation_four_hours_apart_is_413_naming_its_interval() -> None:
    """342 bytes of R5 lead II, 2 points with interval 4 h, is 413 at its interval."""
    sampled = {
        "origin": {"value": 0, "system": UCUM, "code": "mV"},
        "interval": 4,
        "intervalUnit": "h",
        "dimensions": 1,
        "data": "0 1",
    }
    answer = _handle(_lead_ii(sampled), "R5")
    assert answer.status == TOO_LARGE
    issue = _only_issue(answer)
    assert issue["expression"] == ["Observation.valueSampledData.interval"]
    assert "14400 s" in issue["diagnostics"]


@bounded
def test_a_28_hour_lead_of_5000_points_every_20_s_is_not_accepted() -> None:
    """A 5000-point lead II Observation sampled every 20 s is 413 (not 202) at its period."""
    sampled = {
        "origin": {"value": 0, "system": UCUM, "code": "mV"},
        "period": 20_000,
        "dimensions": 1,
        "data": " ".join(str(i % 7) for i in range(5000)),
    }
    answer = _handle(_lead_ii(sampled))
    assert answer.status == TOO_LARGE
    assert _only_issue(answer)["expression"] == ["Observation.valueSampledData.period"]


def test_the_duration_limit_is_points_times_period_and_configurable() -> None:
    """The fixture lasts 9.998 s: accepted under a 10 s limit, 413 under 9.99 s."""
    raw = (FIXTURES / "ecg-sinus.json").read_bytes()
    parse(raw, limits=Limits(max_waveform_seconds=10))
    with pytest.raises(FhirRejected) as caught:
        parse(raw, limits=Limits(max_waveform_seconds=9.99))
    assert caught.value.status == TOO_LARGE


def test_the_ecg_fixtures_are_still_scored() -> None:
    """Both ECG fixtures (R4B and R5) pass the new limits and give a request (202)."""
    assert _handle((FIXTURES / "ecg-sinus.json").read_bytes()).status == 202
    assert _handle((FIXTURES / "ecg-af-r5.json").read_bytes(), "R5").status == 202


# --- non-finite arithmetic ---------------------------------------------------------------------


@bounded
def test_an_origin_of_1e308_volts_is_422_at_the_origin() -> None:
    """origin 1e308 V is infinite in mV: 422 (value) at the origin, not an OverflowError."""
    origin = {"value": 1e308, "unit": "V", "system": UCUM, "code": "V"}
    answer = _handle(_ecg_bundle(origin=origin))
    assert answer.status == INVALID_FHIR
    issue = _only_issue(answer)
    assert (issue["severity"], issue["code"]) == ("error", "value")
    assert issue["expression"] == [f"{LEAD}.origin.value"]
    assert "not a finite number" in issue["diagnostics"]


def test_factor_times_data_that_overflows_is_422_at_the_data() -> None:
    """factor 1e307 on points of up to about 1e3 overflows: 422 (value) at the data."""
    answer = _handle(_ecg_bundle(factor=1e307))
    assert answer.status == INVALID_FHIR
    issue = _only_issue(answer)
    assert issue["expression"] == [f"{LEAD}.data"]
    assert "not a finite number" in issue["diagnostics"]


def test_origin_plus_factor_times_data_that_overflows_is_422_at_the_data() -> None:
    """origin 1.79e308 mV plus points of 1e306 mV each finite: their sum is not, 422 at data."""
    sampled = {
        "origin": {"value": 1.79e308, "unit": "mV", "system": UCUM, "code": "mV"},
        "period": 4,
        "factor": 1e306,
        "dimensions": 1,
        "data": " ".join(["1"] * 2500),
    }
    answer = _handle(_lead_ii(sampled))
    assert answer.status == INVALID_FHIR
    issue = _only_issue(answer)
    assert issue["expression"] == ["Observation.valueSampledData.data"]
    assert "origin + factor x data is not a finite number in mV" in issue["diagnostics"]


def _heart_rate(value: float, unit: str) -> dict[str, Any]:
    observation: dict[str, Any] = json.loads((FIXTURES / "observation-heart-rate.json").read_text())
    observation["valueQuantity"] = {"value": value, "unit": unit, "system": UCUM, "code": unit}
    return observation


@bounded
def test_a_huge_quantity_is_422_as_not_finite() -> None:
    """1e308 /s is infinite in /min: 422 saying so at the value, not an 'inf' reading."""
    answer = _handle(_heart_rate(1e308, "/s"))
    assert answer.status == INVALID_FHIR
    issue = _only_issue(answer)
    assert issue["expression"] == ["Observation.valueQuantity.value"]
    assert "not a finite number" in issue["diagnostics"]
    assert not re.search(r"\binf\b", issue["diagnostics"])


def _with_heart_rate_in(unit: str) -> ModelSpec:
    raw = yaml.safe_load((ROOT / "deploy" / "models" / "deterioration.yaml").read_text())
    (heart_rate,) = (i for i in raw["inputs"] if i["name"] == "heart_rate")
    heart_rate["unit"] = unit
    return parse_spec(raw)


def test_a_huge_quantity_in_a_unit_without_plausible_range_is_refused_too() -> None:
    """Converted to a unit with no physiological range (/h), 1e308 /min is still refused."""
    spec = _with_heart_rate_in("/h")
    payload = parse(json.dumps(_heart_rate(1e308, "/min")).encode())
    extraction = extract(payload.resources, {spec.name: spec})
    assert extraction.readings == ()
    (issue,) = extraction.rejections
    assert issue.expression == ("Observation.valueQuantity.value",)
    assert "not a finite number in /h" in issue.diagnostics


# --- the JSON walk -----------------------------------------------------------------------------


def _empty_lists(size: int = 5 * 1024 * 1024) -> bytes:
    """A JSON object of about ``size`` bytes, nearly all of it empty lists."""
    head, tail = b'{"resourceType": "Observation", "x": [', b"]}"
    lists = (size - len(head) - len(tail) + 1) // 3
    return head + b",".join([b"[]"] * lists) + tail


@bounded
def test_a_5_mib_body_of_empty_lists_is_413_before_it_is_decoded() -> None:
    """1.7 million empty lists are 413 too-costly naming MEDMESH_MAX_JSON_NODES."""
    body = _empty_lists()
    with pytest.raises(FhirRejected) as caught:
        parse(body)
    assert caught.value.status == TOO_LARGE
    (issue,) = caught.value.outcome["issue"]
    assert issue["code"] == "too-costly"
    assert "MEDMESH_MAX_JSON_NODES" in issue["diagnostics"]
    assert "1747" in issue["diagnostics"]  # the count of objects and arrays found


def test_brackets_inside_strings_are_not_counted() -> None:
    """Brackets in a string open no container: 200 of them pass a 10-node limit."""
    observation = _heart_rate(80, "/min")
    observation["code"]["text"] = "[{" * 100
    (parsed,) = parse(json.dumps(observation).encode(), limits=Limits(max_nodes=10)).resources
    assert parsed.resource_type == "Observation"
    with pytest.raises(FhirRejected) as caught:
        parse(json.dumps(observation).encode(), limits=Limits(max_nodes=5))
    assert caught.value.status == TOO_LARGE


@bounded
def test_the_node_count_stays_linear_on_unterminated_strings() -> None:
    """A million escaped quotes in an unterminated string after 100,001 brackets: 413, at once
    (each escaped quote must not start another scan to the end)."""
    body = b"[" * 100_001 + b'"' + b'\\"' * 1_000_000
    with pytest.raises(FhirRejected) as caught:
        parse(body)
    assert caught.value.status == TOO_LARGE
    assert "100001 objects and arrays" in caught.value.outcome["issue"][0]["diagnostics"]


def test_node_count_reads_utf16_bodies_like_json_does() -> None:
    """A UTF-16 body is decoded as json.loads would before its containers are counted."""
    body = json.dumps(_heart_rate(80, "/min")).encode("utf-16")
    assert parse(body, limits=Limits(max_nodes=10)).resources[0].resource_type == "Observation"


def test_depth_is_still_checked_for_empty_containers() -> None:
    """An empty list one level too deep is still 413 too deep (it is not looked into)."""
    body = {"resourceType": "Basic", "code": {"text": "x"}}
    node: Any = body
    for _ in range(3):  # lists at depth 2, 4, 6; objects at 3, 5, 7
        node["extension"] = [{"url": "https://x"}]
        node = node["extension"][0]
    node["x"] = []  # depth 8

    def status(max_depth: int) -> int:
        with pytest.raises(FhirRejected) as caught:
            parse(json.dumps(body).encode(), limits=Limits(max_depth=max_depth))
        return caught.value.status

    assert status(7) == TOO_LARGE
    assert status(8) == INVALID_FHIR  # deep enough; then Basic's unknown element x


# --- settings ----------------------------------------------------------------------------------


def test_the_limits_are_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """MEDMESH_MAX_WAVEFORM_SECONDS and MEDMESH_MAX_JSON_NODES are read, with sane defaults."""
    defaults = IngestSettings()
    assert (defaults.max_waveform_seconds, defaults.max_json_nodes) == (3600.0, 100_000)
    assert (Limits().max_waveform_seconds, Limits().max_nodes) == (3600.0, 100_000)
    monkeypatch.setenv("MEDMESH_MAX_WAVEFORM_SECONDS", "600")
    monkeypatch.setenv("MEDMESH_MAX_JSON_NODES", "5000")
    configured = IngestSettings()
    assert (configured.max_waveform_seconds, configured.max_json_nodes) == (600.0, 5000)
