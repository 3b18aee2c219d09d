"""ecg-rhythm v1 (deploy/triton/models/ecg-rhythm/1/model.py): QRS detection and the AF screen.

The model module and the fixture generator (tests/fixtures/fhir/make_ecg_fixtures.py) are loaded
by path, without Triton; the committed ECG fixtures are read by ingest's own extraction, so the
rows screened here are exactly the tensors the worker would send.
"""

from __future__ import annotations

import math
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import numpy as np
import pytest

from medmesh_contracts.events import FhirVersion
from medmesh_contracts.modelspec import ModelSpec, RiskScoreOutput, load_spec
from tests.ingest_support import ingest
from tests.modules import load_file

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "deploy" / "triton" / "models" / "ecg-rhythm" / "1" / "model.py"
GENERATOR = ROOT / "tests" / "fixtures" / "fhir" / "make_ecg_fixtures.py"
FIXTURES = ROOT / "tests" / "fixtures" / "fhir"
REGULAR, IRREGULAR, UNREADABLE = 0, 1, 2


@pytest.fixture(scope="module")
def ecg() -> ModuleType:
    """The ecg-rhythm version 1 model module."""
    return load_file(MODEL, "ecg_rhythm_v1_model_under_test")


@pytest.fixture(scope="module")
def gen() -> ModuleType:
    """The synthetic ECG generator that wrote the fixtures."""
    return load_file(GENERATOR, "make_ecg_fixtures_under_test")


@pytest.fixture(scope="module")
def spec() -> ModelSpec:
    """The ecg-rhythm model spec."""
    return load_spec(ROOT / "deploy" / "models" / "ecg-rhythm.yaml")


def _synthetic_row(gen: ModuleType, rhythm: str, seed: int, **kwargs: Any) -> Any:
    return gen.synthetic_ecg(rhythm, seed, rate_hz=250.0, **kwargs)


def test_model_constants_match_the_spec(ecg: ModuleType, spec: ModelSpec) -> None:
    """Rate, length, tensor names and the FEATURES order are those of ecg-rhythm.yaml."""
    (lead,) = spec.inputs
    assert lead.waveform is not None
    assert lead.waveform.sample_rate_hz == ecg.SAMPLE_RATE_HZ
    assert lead.waveform.samples == ecg.N_SAMPLES
    version = spec.version(1)
    assert [t.name for t in version.triton.inputs] == [ecg.INPUT]
    headline, explanation = version.headline, version.explanation
    assert isinstance(headline, RiskScoreOutput)
    assert explanation is not None
    assert (headline.score_tensor, headline.band_tensor, explanation.tensor) == ecg.OUTPUTS
    names = [c.name for c in explanation.items]
    assert names == ["heart_rate", "beats", "rr_cv", "rr_nrmssd", "turning_point_ratio"]
    assert len(names) == ecg.N_FEATURES


def test_regular_rr_series_has_no_irregularity(ecg: ModuleType) -> None:
    """RR 1.0 s throughout: 60 /min, CV 0, normalized RMSSD 0, no turning points."""
    features = ecg.rr_features(np.array([1.0, 1.0, 1.0, 1.0]))
    assert features.heart_rate == pytest.approx(60.0)
    assert features.beats == 5
    assert (features.rr_cv, features.rr_nrmssd, features.turning_point_ratio) == (0.0, 0.0, 0.0)


def test_alternating_rr_series_features_by_hand(ecg: ModuleType) -> None:
    """RR 0.8/1.0 alternating: mean 0.88, std 0.098 (CV 0.1113), RMSSD 0.2 (0.2273), TPR 1.5."""
    features = ecg.rr_features(np.array([0.8, 1.0, 0.8, 1.0, 0.8]))
    assert features.heart_rate == pytest.approx(75.0)  # median RR 0.8 s
    assert features.rr_cv == pytest.approx(math.sqrt(0.0096) / 0.88)
    assert features.rr_nrmssd == pytest.approx(0.2 / 0.88)
    # 3 turning points (every inner interval) over 2 (N - 2) / 3 = 2 expected.
    assert features.turning_point_ratio == pytest.approx(1.5)


def test_af_probability_is_the_documented_logistic(ecg: ModuleType) -> None:
    """z = -8 + 40 nRMSSD + 30 CV: 50 % at z = 0, 100 / (1 + e^8) % for a perfectly regular RR."""
    boundary = ecg.RhythmFeatures(70.0, 12, 0.0, 0.2, 1.0)
    assert ecg.af_probability(boundary) == pytest.approx(50.0)
    regular = ecg.RhythmFeatures(70.0, 12, 0.0, 0.0, 0.0)
    assert ecg.af_probability(regular) == pytest.approx(100 / (1 + math.exp(8)))


def test_too_few_rr_intervals_are_refused(ecg: ModuleType) -> None:
    """Fewer than three RR intervals, or a non-positive one, is a ValueError."""
    with pytest.raises(ValueError, match="at least 3"):
        ecg.rr_features(np.array([1.0, 1.0]))
    with pytest.raises(ValueError, match="at least 3"):
        ecg.rr_features(np.array([1.0, 0.0, 1.0]))


@pytest.mark.parametrize("rhythm", ["sinus", "af"])
def test_every_synthetic_r_peak_is_found_once(
    ecg: ModuleType, gen: ModuleType, rhythm: str
) -> None:
    """On 10 synthetic strips per rhythm, each R peak is detected once, within 12 ms."""
    for seed in range(10):
        row = np.asarray(_synthetic_row(gen, rhythm, seed))[np.newaxis, :]
        filtered = ecg.band_pass(row)
        peaks = ecg.r_peaks(filtered[0], ecg.integrated_energy(filtered)[0])
        truth = np.asarray(gen.beat_times(rhythm, seed)) * ecg.SAMPLE_RATE_HZ
        assert len(peaks) == len(truth), seed
        assert np.abs(peaks - truth).max() <= 3, seed  # 3 samples = 12 ms at 250 Hz


def test_synthetic_rhythms_are_told_apart(ecg: ModuleType, gen: ModuleType) -> None:
    """20 sinus strips are all regular (score < 5 %), 20 AF-like strips all irregular (> 90 %)."""
    sinus = np.stack([_synthetic_row(gen, "sinus", s) for s in range(20)])
    af = np.stack([_synthetic_row(gen, "af", s) for s in range(20)])
    score, band, _ = ecg.screen(sinus)
    assert (band == REGULAR).all()
    assert score.max() < 5
    score, band, _ = ecg.screen(af)
    assert (band == IRREGULAR).all()
    assert score.min() > 90


def _fixture_row(name: str, version: FhirVersion, spec: ModelSpec) -> Any:
    raw = (FIXTURES / name).read_bytes()
    (request,) = ingest(raw, {spec.name: spec}, fhir_version=version).requests
    (lead,) = request.inputs
    assert lead.samples is not None
    return np.asarray(lead.samples, dtype=np.float32)


@pytest.mark.parametrize(
    ("name", "version", "band"),
    [
        ("ecg-sinus.json", "R4B", REGULAR),
        ("ecg-af.json", "R4B", IRREGULAR),
        ("ecg-sinus-r5.json", "R5", REGULAR),
        ("ecg-af-r5.json", "R5", IRREGULAR),
    ],
)
def test_committed_fixtures_read_by_ingest_get_their_band(
    ecg: ModuleType, spec: ModelSpec, name: str, version: FhirVersion, band: int
) -> None:
    """Each committed ECG fixture, extracted by ingest, is screened into its rhythm's band."""
    score, found, features = ecg.screen(_fixture_row(name, version, spec)[np.newaxis, :])
    assert int(found[0, 0]) == band
    assert 50 <= features[0, 0] <= 120  # heart rate /min
    assert features[0, 1] >= 10  # R peaks in 10 s
    assert (score[0, 0] >= 50) == (band == IRREGULAR)


def test_flat_noise_and_short_signals_are_unreadable(ecg: ModuleType, gen: ModuleType) -> None:
    """A flat line, pure noise, and 2 s of sinus padded to 10 s are band 2 with score 0."""
    flat = np.zeros(ecg.N_SAMPLES)
    noise = np.random.default_rng(7).normal(0.0, 0.15, ecg.N_SAMPLES)
    short = np.asarray(_synthetic_row(gen, "sinus", 3))
    short[500:] = short[499]  # what ingest's end padding looks like
    score, band, features = ecg.screen(np.stack([flat, noise, short]))
    assert band.ravel().tolist() == [UNREADABLE] * 3
    assert score.ravel().tolist() == [0.0] * 3
    assert features[0].tolist() == [0.0] * 5
    assert features[2, 1] < ecg.MIN_BEATS  # the beats found are reported


def test_wrong_shape_and_non_finite_values_are_refused(ecg: ModuleType) -> None:
    """A row of another length or holding NaN is a ValueError naming the tensor."""
    with pytest.raises(ValueError, match="ECG must have shape"):
        ecg.check_ecg(np.zeros((1, 100)))
    row = np.zeros((1, ecg.N_SAMPLES))
    row[0, 5] = np.nan
    with pytest.raises(ValueError, match="not finite"):
        ecg.check_ecg(row)


def _fake_pb() -> SimpleNamespace:
    class Tensor:
        def __init__(self, name: str, array: Any) -> None:
            self.name, self.array = name, array

    class Response:
        def __init__(self, output_tensors: list[Any], error: Any = None) -> None:
            self.output_tensors, self.error = output_tensors, error

    class Request:
        def __init__(self, array: Any) -> None:
            self.array = array

    def get_input_tensor_by_name(request: Any, name: str) -> Any:
        return SimpleNamespace(as_numpy=lambda: request.array)

    return SimpleNamespace(
        Tensor=Tensor,
        InferenceResponse=Response,
        TritonError=str,
        get_input_tensor_by_name=get_input_tensor_by_name,
        Request=Request,
    )


def test_execute_answers_each_request_and_isolates_a_bad_one(
    ecg: ModuleType, gen: ModuleType
) -> None:
    """Three requests in one execute: two batches screened together, one wrong shape errors."""
    pb = _fake_pb()
    model = ecg.TritonPythonModel()
    model.pb = pb
    sinus = np.stack([_synthetic_row(gen, "sinus", s) for s in (1, 2)]).astype(np.float32)
    af = _synthetic_row(gen, "af", 1)[np.newaxis, :].astype(np.float32)
    responses = model.execute([pb.Request(sinus), pb.Request(np.zeros((1, 3))), pb.Request(af)])
    assert responses[1].error is not None
    assert responses[1].output_tensors == []
    bands = [{t.name: t.array for t in responses[i].output_tensors}["RHYTHM_BAND"] for i in (0, 2)]
    assert bands[0].ravel().tolist() == [REGULAR, REGULAR]
    assert bands[1].ravel().tolist() == [IRREGULAR]
    shapes = {t.name: t.array.shape for t in responses[0].output_tensors}
    assert shapes == {"SCORE": (2, 1), "RHYTHM_BAND": (2, 1), "FEATURES": (2, 5)}
