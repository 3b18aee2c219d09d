"""Ingest's reading of FHIR SampledData (R4B period, R5 interval) into waveform model inputs."""

from __future__ import annotations

import json
import math
from copy import deepcopy
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from fhir.resources import sampleddata as r5_sampleddata
from fhir.resources.R4B.sampleddata import SampledData

from medmesh_contracts.events import Producer
from medmesh_contracts.modelspec import (
    MAX_INPUT_WIDTH,
    InputSpec,
    ModelSpec,
    WaveformSpec,
    load_spec,
    parse_spec,
)
from medmesh_ingest.extraction import PatientReadings, Reading, extract
from medmesh_ingest.outcomes import TOO_LARGE, FhirRejected
from medmesh_ingest.readings import merge
from medmesh_ingest.validation import Limits, parse
from medmesh_ingest.waveforms import (
    MAX_UPSAMPLING,
    WaveformError,
    read_waveform,
    sample_count,
    signal_seconds,
)
from tests.ingest_support import ingest

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "fhir"
UV = {"value": 0, "unit": "uV", "system": "http://unitsofmeasure.org", "code": "uV"}
# 1000 Hz in, 1000 Hz out, 4 samples: values pass through unchanged (but for conversion).
SAME_RATE = WaveformSpec(sample_rate_hz=1000, samples=4)
WAVE = {"kind": "waveform"}


@pytest.fixture(scope="module")
def spec() -> ModelSpec:
    """The ecg-rhythm model spec."""
    return load_spec(ROOT / "deploy" / "models" / "ecg-rhythm.yaml")


def r4b(**fields: Any) -> Any:
    """An R4B SampledData (origin 0 uV, 1 ms period unless given)."""
    return SampledData.model_validate({"origin": UV, "period": 1, "dimensions": 1} | fields)


def r5(**fields: Any) -> Any:
    """An R5 SampledData (origin 0 uV, 1 ms interval unless given)."""
    base = {"origin": UV, "interval": 1, "intervalUnit": "ms", "dimensions": 1}
    return r5_sampleddata.SampledData.model_validate(base | fields)


def test_origin_and_factor_give_the_value_converted_to_the_input_unit() -> None:
    """value = origin + factor * data, in origin's unit (uV), converted to mV."""
    sampled = r4b(origin=UV | {"value": 100}, factor=2.5, data="0 40 -40 400")
    waveform = read_waveform(sampled, "mV", SAME_RATE)
    assert waveform.samples == pytest.approx((0.1, 0.2, 0.0, 1.1))
    assert waveform.period_ms == 1.0
    assert waveform.duration_s == pytest.approx(0.003)


def test_limits_and_gaps_are_filled() -> None:
    """L and U take lowerLimit and upperLimit (origin units); E is interpolated from neighbours."""
    sampled = r4b(data="100 E 300 L U E", lowerLimit=-500, upperLimit=500)
    lenient = WaveformSpec(sample_rate_hz=1000, samples=6, max_gap_fraction=0.5)
    samples = read_waveform(sampled, "uV", lenient).samples
    assert samples == pytest.approx((100, 200, 300, -500, 500, 500))


def test_limit_points_without_their_limit_are_unreadable() -> None:
    """An L point without lowerLimit names lowerLimit."""
    with pytest.raises(WaveformError) as caught:
        read_waveform(r4b(data="1 L 2 3"), "uV", SAME_RATE)
    assert caught.value.element == "lowerLimit"


def test_too_many_gaps_and_garbage_are_unreadable() -> None:
    """More E points than max_gap_fraction, or a token that is no decimal, names data."""
    with pytest.raises(WaveformError, match="no valid data"):
        read_waveform(r4b(data="1 E E 4"), "uV", SAME_RATE)
    with pytest.raises(WaveformError, match="not a decimal"):
        read_waveform(r4b(data="1 2 x 4"), "uV", SAME_RATE)


def test_r4b_period_and_r5_interval_read_the_same_signal() -> None:
    """R4B period 2 (ms) and R5 interval 0.002 s give identical samples."""
    data = " ".join(str(i * 10) for i in range(9))
    spec = WaveformSpec(sample_rate_hz=500, samples=8)
    from_r4b = read_waveform(r4b(period=2, data=data), "uV", spec)
    from_r5 = read_waveform(r5(interval=0.002, intervalUnit="s", data=data), "uV", spec)
    assert from_r4b == from_r5
    assert from_r4b.samples == tuple(float(i * 10) for i in range(1, 9))  # the last 8 kept


def test_r5_offsets_and_several_dimensions_are_not_read() -> None:
    """Irregular sampling (offsets) and interleaved channels (dimensions 2) are refused."""
    offsets = r5_sampleddata.SampledData.model_validate(
        {
            "origin": UV,
            "offsets": "0 1 3 4",
            "intervalUnit": "ms",
            "dimensions": 1,
            "data": "1 2 3 4",
        }
    )
    with pytest.raises(WaveformError) as caught:
        read_waveform(offsets, "uV", SAME_RATE)
    assert caught.value.element == "offsets"
    with pytest.raises(WaveformError) as caught:
        read_waveform(r4b(dimensions=2, data="1 2 3 4"), "uV", SAME_RATE)
    assert caught.value.element == "dimensions"


def test_an_origin_in_another_dimension_is_unreadable() -> None:
    """Origin in mm[Hg] for an mV input names origin.code."""
    origin = UV | {"unit": "mm[Hg]", "code": "mm[Hg]"}
    with pytest.raises(WaveformError) as caught:
        read_waveform(r4b(origin=origin, data="1 2 3 4"), "mV", SAME_RATE)
    assert caught.value.element == "origin.code"


def test_resampling_cropping_and_padding() -> None:
    """1000 Hz to 500 Hz keeps every other point; longer keeps the end; shorter pads the end."""
    spec = WaveformSpec(sample_rate_hz=500, samples=4, min_samples=3)
    data = " ".join(str(v) for v in range(9))  # 0..8 at 1 ms: 0 2 4 6 8 at 2 ms
    assert read_waveform(r4b(data=data), "uV", spec).samples == (2.0, 4.0, 6.0, 8.0)
    assert read_waveform(r4b(data="0 1 2 3 4"), "uV", spec).samples == (0.0, 2.0, 4.0, 4.0)
    assert read_waveform(r4b(data="0 1 2 3 4 5 7 9"), "uV", spec).samples == (
        0.0,
        2.0,
        4.0,
        7.0,
    )


def _resampled_whole(values: list[float], period_ms: float, target_ms: float) -> list[float]:
    """The whole signal resampled, as ingest did before it computed only the kept tail."""
    if math.isclose(period_ms, target_ms, rel_tol=1e-9):
        return list(values)
    count = math.floor((len(values) - 1) * period_ms / target_ms + 1e-9) + 1
    out: list[float] = []
    last = len(values) - 1
    for k in range(count):
        position = k * target_ms / period_ms
        i = min(int(position), last)
        share = position - i
        out.append(
            values[i]
            if i >= last or share <= 0
            else values[i] + share * (values[i + 1] - values[i])
        )
    return out


@pytest.mark.parametrize("period", [0.5, 1, 2, 2.5, 3, 4, 1000 / 360, 7, 13, 40])
@pytest.mark.parametrize("points", [2, 9, 250, 1001, 3000])
def test_only_the_kept_tail_is_computed_and_it_is_the_same(period: float, points: int) -> None:
    """The kept samples equal the last ones of the whole signal resampled, padded alike, for
    downsampling, the same rate and upsampling up to the limit."""
    spec = WaveformSpec(sample_rate_hz=250, samples=500, min_samples=2)
    values = [float((i * 37) % 101 - 50) for i in range(points)]
    sampled = r4b(period=period, data=" ".join(f"{v:g}" for v in values))
    whole = _resampled_whole(values, period, spec.period_ms)
    if len(whole) < spec.shortest:
        with pytest.raises(WaveformError, match="at least"):
            read_waveform(sampled, "uV", spec)
        return
    kept = whole[-spec.samples :]
    kept += [kept[-1]] * (spec.samples - len(kept))
    six_digits = [round(v, 5 - math.floor(math.log10(abs(v)))) + 0.0 if v else 0.0 for v in kept]
    assert read_waveform(sampled, "uV", spec).samples == tuple(six_digits)


def test_a_period_more_than_max_upsampling_times_the_rate_is_implausible() -> None:
    """At 250 Hz, 40 ms between points is read; 40.1 ms, 1 s or 4 h (R5) are implausible,
    naming the period (R4B) or the interval (R5)."""
    spec = WaveformSpec(sample_rate_hz=250, samples=4, min_samples=2)
    assert MAX_UPSAMPLING * spec.period_ms == 40
    assert len(read_waveform(r4b(period=40, data="0 1 2"), "uV", spec).samples) == 4
    for sampled, element in (
        (r4b(period=40.1, data="0 1 2"), "period"),
        (r4b(period=1000, data="0 1 2"), "period"),
        (r5(interval=4, intervalUnit="h", data="0 1"), "interval"),
    ):
        with pytest.raises(WaveformError, match="at most 40 ms") as caught:
            read_waveform(sampled, "uV", spec)
        assert (caught.value.element, caught.value.implausible) == (element, True)


def test_signal_seconds_is_points_times_the_period() -> None:
    """(points per dimension - 1) x period, with the element naming the period; None without
    a usable period."""
    assert signal_seconds(r4b(period=2, data="1 2 3 4 5")) == ("period", 0.008)
    assert signal_seconds(r5(interval=4, intervalUnit="h", data="0 1")) == ("interval", 14400)
    assert signal_seconds(r4b(period=2, dimensions=2, data="1 2 3 4 5 6")) == ("period", 0.004)
    assert signal_seconds(r5(interval=4, intervalUnit="kg", data="0 1")) is None


def test_values_that_are_not_finite_are_implausible() -> None:
    """factor x data, a limit, origin + factor x data or the converted origin that is not a
    finite number makes the signal implausible, naming the element."""
    cases = (
        (r4b(factor=1e300, data="1 1e10 2 3"), "uV", "data"),
        (
            r4b(data="1 L 2 3", lowerLimit=-1.7e308, origin=UV | {"value": 1.7e308}),
            "uV",
            "lowerLimit",
        ),
        (r4b(data="1 2 3 1e308", origin=UV | {"value": 1.7e308}), "uV", "data"),
        (
            r4b(origin=UV | {"value": 1e308, "unit": "V", "code": "V"}, data="1 2 3 4"),
            "mV",
            "origin.value",
        ),
    )
    for sampled, unit, element in cases:
        with pytest.raises(WaveformError, match="not a finite number") as caught:
            read_waveform(sampled, unit, SAME_RATE)
        assert (caught.value.element, caught.value.implausible) == (element, True)


def test_a_signal_too_short_is_unreadable() -> None:
    """Fewer samples than min_samples at the spec's rate says how long it lasted and must last."""
    spec = WaveformSpec(sample_rate_hz=500, samples=4, min_samples=3)
    with pytest.raises(WaveformError, match=r"lasts 0\.002 s; at least 0\.004 s"):
        read_waveform(r4b(data="0 1 2"), "uV", spec)


def test_fixture_observation_becomes_a_waveform_input(spec: ModelSpec) -> None:
    """The R4B fixture's lead-II component is 2500 mV samples at 4 ms; value is its last sample
    (in mV, like the unit says) and duration_s how long the signal received lasted."""
    ingested = ingest((FIXTURES / "ecg-sinus.json").read_bytes(), {spec.name: spec})
    assert ingested.issues == ()
    (request,) = ingested.requests
    assert request.subject_reference == "Patient/example-ecg-sinus"
    (lead,) = request.inputs
    assert lead.samples is not None
    assert (lead.name, lead.unit, lead.period_ms, len(lead.samples)) == (
        "ecg_lead_ii",
        "mV",
        4.0,
        2500,
    )
    assert lead.value == lead.samples[-1]
    assert abs(lead.value) < 5.0  # a potential in mV, not a duration
    assert lead.duration_s == pytest.approx(9.998)  # 5000 points 2 ms apart
    assert max(lead.samples) > 1.0  # R waves of about 1.2 mV


def test_r4b_and_r5_fixtures_are_read_alike(spec: ModelSpec) -> None:
    """The R5 fixture (lead II Observation, interval + intervalUnit) gives a complete input too."""
    raw = (FIXTURES / "ecg-af-r5.json").read_bytes()
    (request,) = ingest(raw, {spec.name: spec}, fhir_version="R5").requests
    (lead,) = request.inputs
    assert lead.period_ms == 4.0
    assert lead.samples is not None
    assert len(lead.samples) == 2500


def _with_data(name: str, data: str) -> bytes:
    bundle = json.loads((FIXTURES / name).read_text())
    observation = bundle["entry"][1]["resource"]
    observation["component"][0]["valueSampledData"]["data"] = data
    return json.dumps(bundle).encode()


def test_a_short_ecg_is_an_error_issue_and_nothing_is_scored(spec: ModelSpec) -> None:
    """3 s of ECG: an error issue naming the SampledData, and the model gets no inputs."""
    ingested = ingest(_with_data("ecg-sinus.json", " ".join(["0"] * 1500)), {spec.name: spec})
    assert ingested.requests == ()
    (issue,) = ingested.issues
    assert issue.severity == "error"
    assert issue.expression == ("Bundle.entry[1].resource.component[0].valueSampledData.data",)
    assert "at least 7.996 s" in issue.diagnostics


def test_waveforms_over_the_size_limit_are_413() -> None:
    """A SampledData with more points than max_waveform_samples is 413 naming its data."""
    raw = (FIXTURES / "ecg-sinus.json").read_bytes()
    parse(raw, limits=Limits(max_waveform_samples=5000))
    with pytest.raises(FhirRejected) as caught:
        parse(raw, limits=Limits(max_waveform_samples=4999))
    assert caught.value.status == TOO_LARGE
    (issue,) = caught.value.outcome["issue"]
    assert issue["code"] == "too-costly"
    assert issue["expression"] == ["Bundle.entry[1].resource.component[0].valueSampledData.data"]


def test_sample_count_counts_every_point() -> None:
    """E, L and U count as points; no data counts none."""
    assert sample_count(r4b(data="1 E L U 5")) == 5
    assert sample_count(r4b()) == 0


def test_waveform_readings_reach_the_request_and_the_state(spec: ModelSpec) -> None:
    """Merging a waveform reading keeps its samples in the state and sends them in the request;
    another ECG at the same time with other samples is a new request."""
    payload = parse((FIXTURES / "ecg-sinus.json").read_bytes())
    (found,) = extract(payload.resources, {spec.name: spec}).readings
    now = datetime(2026, 11, 23, 15, 0, tzinfo=UTC)
    producer = Producer(service="ingest", instance="test")

    def merged(readings: PatientReadings, previous: Any = None) -> Any:
        return merge(
            previous,
            spec=spec,
            pseudonym="p",
            found=readings,
            order=None,
            received_at=now,
            lookback=timedelta(hours=4),
            producer=producer,
        )

    first = merged(found)
    assert first.inputs is not None
    (sent,) = first.inputs
    (kept,) = first.state.readings
    assert sent.samples == kept.samples == found.readings["ecg_lead_ii"].input.samples
    assert sent.period_ms == kept.period_ms == 4.0
    assert merged(found, first.state).duplicate
    reading = found.readings["ecg_lead_ii"]
    assert reading.input.samples is not None
    changed_input = reading.input.model_copy(
        update={"samples": tuple(-v for v in reading.input.samples)}
    )
    other = dict(deepcopy(found.readings)) | {
        "ecg_lead_ii": Reading(changed_input, "2")  # a corrected version of the resource
    }
    again = merged(PatientReadings(found.model, found.subject_reference, None, other), first.state)
    assert again.inputs is not None
    assert not again.duplicate


def test_spec_waveform_inputs_are_consistent() -> None:
    """A waveform source needs a waveform input (and back), and min_samples <= samples."""
    source = {"code": {"system": "urn:oid:2.16.840.1.113883.6.24", "code": "131330"}}
    waveform = {"sample_rate_hz": 250, "samples": 2500}
    base = {"name": "lead", "display": "Lead", "unit": "mV"}
    InputSpec.model_validate(base | {"waveform": waveform, "sources": [source | WAVE]})
    with pytest.raises(ValueError, match="has a waveform source but no 'waveform'"):
        InputSpec.model_validate(base | {"sources": [source | WAVE]})
    with pytest.raises(ValueError, match="waveform sources only"):
        InputSpec.model_validate(base | {"waveform": waveform, "sources": [source]})
    with pytest.raises(ValueError, match="min_samples cannot exceed"):
        WaveformSpec(sample_rate_hz=250, samples=10, min_samples=11)


def test_spec_input_width_is_bounded() -> None:
    """A spec whose inputs would fill more than MAX_INPUT_WIDTH tensor columns is refused."""
    raw = yaml.safe_load((ROOT / "deploy" / "models" / "ecg-rhythm.yaml").read_text())
    waveform = raw["inputs"][0]["waveform"]
    at_limit = deepcopy(raw)
    at_limit["inputs"][0]["waveform"] = waveform | {"samples": MAX_INPUT_WIDTH}
    at_limit["versions"][0]["triton"]["inputs"][0]["shape"] = [MAX_INPUT_WIDTH]
    accepted = parse_spec(at_limit).version(1)
    assert sum(t.elements for t in accepted.triton.inputs) == MAX_INPUT_WIDTH
    over = deepcopy(raw)
    over["inputs"][0]["waveform"] = waveform | {"samples": MAX_INPUT_WIDTH + 1}
    over["versions"][0]["triton"]["inputs"][0]["shape"] = [MAX_INPUT_WIDTH + 1]
    with pytest.raises(ValueError, match=f"at most {MAX_INPUT_WIDTH}"):
        parse_spec(over)
