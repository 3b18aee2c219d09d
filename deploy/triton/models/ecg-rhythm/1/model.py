"""ecg-rhythm v1: rhythm irregularity screen (possible atrial fibrillation) from one ECG lead.

The input ``ECG`` is a float32 batch ``[n, 2500]``: 10 s of one lead in mV at 250 Hz, as the model
spec says (deploy/models/ecg-rhythm.yaml; ingest resamples, crops and pads the FHIR SampledData).

Per row, in numpy:

1. QRS enhancement after Pan and Tompkins (IEEE Trans Biomed Eng 1985): a 5-15 Hz band-pass
   (FFT mask with raised-cosine edges, on the signal mirror-padded by 0.5 s so the circular
   filter does not wrap), the five-point derivative, squaring, and a 150 ms moving-window
   integration.
2. R-peak picking: local maxima of the integrated signal above ``THRESHOLD_FRACTION`` of its 99th
   percentile, strongest first, none closer than ``REFRACTORY_S`` to a kept one; each is moved to
   the largest absolute band-passed value within ``REFINE_S`` of it.
3. RR intervals (s) between successive R peaks, and their irregularity features:
   ``rr_cv`` = std(RR) / mean(RR); ``rr_nrmssd`` = sqrt(mean(diff(RR)^2)) / mean(RR);
   ``turning_point_ratio`` = turning points of the RR series / their expectation for a random
   series, 2 (N - 2) / 3 (about 1 when the order of RR intervals is random, as in AF).
4. The AF-screen score, a logistic of the two dispersion features with hand-set (not fitted)
   coefficients: ``z = -8 + 40 rr_nrmssd + 30 rr_cv``, ``SCORE = 100 / (1 + exp(-z))`` percent.
   It is 50 % where 40 a + 30 b = 8, i.e. at rr_nrmssd = rr_cv = 0.114: the order of the
   normalized-RMSSD threshold of 0.1 that Dash et al. (Ann Biomed Eng 2009) used for AF on RR
   series. Both features at 0.02 score 0.14 %, both at 0.05 score 1.1 %, both at 0.1 score 27 %.

``RHYTHM_BAND`` ``[n, 1]``: 0 regular, 1 irregular (possible AF: SCORE >= 50 %), 2 unreadable:
fewer than ``MIN_BEATS`` R peaks, a flat signal (peak-to-peak below ``MIN_AMPLITUDE_MV``), R peaks
that do not stand out of the integrated signal (median peak below ``MIN_PEAK_TO_BASELINE`` times
its median: noise, not QRS complexes), or a heart rate outside ``HEART_RATE_RANGE``. An unreadable
row scores 0 and its features are 0 except the beat count: placeholders, not findings (the spec
gives band 2 ``data_absent_reason: error``, so reporting reports no value and no components).

``FEATURES`` ``[n, 5]`` (the spec's contributions, in this order): heart rate /min (60 / median
RR), R peaks detected, rr_cv, rr_nrmssd, turning_point_ratio.

A screen, not a diagnosis: frequent ectopic beats also make RR irregular and raise the score.
Validation: only on the project's own synthetic ECG generator (tests/fixtures/fhir/
make_ecg_fixtures.py: Gaussian P-QRS-T waves, baseline wander, white noise, fibrillatory waves for
AF; RR jittered or drawn independently), never on real ECGs or a clinical database, and every
threshold and coefficient above is hand-set: the figures here describe that synthetic data only.
Real recordings (motion artefacts, other arrhythmias, paced rhythms) are untested.

This file must load unchanged in NVIDIA's Triton container: it imports only numpy and the
standard library at module level, and ``triton_python_backend_utils`` lazily, so that unit
tests can import it without Triton.
"""

from __future__ import annotations

import importlib
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

SAMPLE_RATE_HZ = 250.0
N_SAMPLES = 2500
INPUT = "ECG"
OUTPUTS = ("SCORE", "RHYTHM_BAND", "FEATURES")
N_FEATURES = 5

BAND_REGULAR = 0
BAND_IRREGULAR = 1
BAND_UNREADABLE = 2

# QRS enhancement (Pan-Tompkins).
PASS_BAND_HZ = (5.0, 15.0)
TAPER_HZ = 2.0
PAD_S = 0.5
INTEGRATION_S = 0.150
# R-peak picking.
THRESHOLD_FRACTION = 0.3
REFRACTORY_S = 0.25
REFINE_S = 0.08
# Readability.
MIN_BEATS = 5
MIN_AMPLITUDE_MV = 0.2
MIN_PEAK_TO_BASELINE = 4.0
HEART_RATE_RANGE = (30.0, 220.0)
# AF screen: log-odds = INTERCEPT + sum(coefficient * feature).
INTERCEPT = -8.0
COEFFICIENTS = {"rr_nrmssd": 40.0, "rr_cv": 30.0}
IRREGULAR_FROM_PERCENT = 50.0


class RhythmFeatures(NamedTuple):
    """What the RR series of one row says (a NamedTuple: a Triton model module is loaded
    without being registered in sys.modules, which dataclasses would need)."""

    heart_rate: float
    beats: int
    rr_cv: float
    rr_nrmssd: float
    turning_point_ratio: float

    def as_row(self) -> list[float]:
        """The FEATURES row, in the spec's contributions order."""
        return [
            self.heart_rate,
            float(self.beats),
            self.rr_cv,
            self.rr_nrmssd,
            self.turning_point_ratio,
        ]


def check_ecg(ecg: npt.NDArray[Any]) -> npt.NDArray[np.float64]:
    """The batch as float64 ``[n, N_SAMPLES]``; ValueError for a wrong shape or a non-finite value."""
    array = np.asarray(ecg, dtype=np.float64)
    if array.ndim != 2 or array.shape[1] != N_SAMPLES:
        raise ValueError(f"{INPUT} must have shape [n, {N_SAMPLES}], got {list(array.shape)}")
    if not np.isfinite(array).all():
        raise ValueError(f"{INPUT} holds a value that is not finite (NaN or infinite)")
    return array


def band_pass(ecg: npt.NDArray[np.float64], rate: float = SAMPLE_RATE_HZ) -> npt.NDArray[Any]:
    """Each row band-passed to ``PASS_BAND_HZ`` (mirror-padded FFT mask, raised-cosine edges)."""
    pad = int(PAD_S * rate)
    padded = np.pad(ecg - ecg.mean(axis=1, keepdims=True), ((0, 0), (pad, pad)), mode="reflect")
    frequencies = np.fft.rfftfreq(padded.shape[1], d=1.0 / rate)
    low, high = PASS_BAND_HZ
    rise = np.clip((frequencies - (low - TAPER_HZ)) / TAPER_HZ, 0.0, 1.0)
    fall = np.clip(((high + TAPER_HZ) - frequencies) / TAPER_HZ, 0.0, 1.0)
    gain = np.sin(np.pi / 2 * rise) ** 2 * np.sin(np.pi / 2 * fall) ** 2
    filtered = np.fft.irfft(np.fft.rfft(padded, axis=1) * gain, n=padded.shape[1], axis=1)
    return filtered[:, pad : pad + ecg.shape[1]]


def integrated_energy(filtered: npt.NDArray[Any], rate: float = SAMPLE_RATE_HZ) -> npt.NDArray[Any]:
    """Five-point derivative, squared, averaged over a centred ``INTEGRATION_S`` window."""
    padded = np.pad(filtered, ((0, 0), (2, 2)), mode="edge")
    derivative = (2 * padded[:, 4:] + padded[:, 3:-1] - padded[:, 1:-3] - 2 * padded[:, :-4]) * (
        rate / 8
    )
    squared = derivative**2
    width = max(1, round(INTEGRATION_S * rate))
    kernel = np.ones(width) / width
    return np.stack([np.convolve(row, kernel, mode="same") for row in squared])


def r_peaks(
    filtered: npt.NDArray[Any], energy: npt.NDArray[Any], rate: float = SAMPLE_RATE_HZ
) -> npt.NDArray[np.int64]:
    """Sample indexes of the R peaks of one row (``filtered`` and ``energy`` are 1-D)."""
    threshold = THRESHOLD_FRACTION * float(np.percentile(energy, 99))
    if threshold <= 0:
        return np.zeros(0, dtype=np.int64)
    inner = energy[1:-1]
    maxima = np.nonzero((inner > energy[:-2]) & (inner >= energy[2:]) & (inner > threshold))[0] + 1
    refractory = round(REFRACTORY_S * rate)
    kept: list[int] = []
    for index in maxima[np.argsort(-energy[maxima], kind="stable")]:
        if all(abs(int(index) - k) >= refractory for k in kept):
            kept.append(int(index))
    reach = round(REFINE_S * rate)
    refined = []
    for index in sorted(kept):
        start, stop = max(0, index - reach), min(len(filtered), index + reach + 1)
        refined.append(start + int(np.argmax(np.abs(filtered[start:stop]))))
    return np.unique(np.asarray(refined, dtype=np.int64))


def rr_features(rr: npt.NDArray[Any], beats: int | None = None) -> RhythmFeatures:
    """Heart rate and irregularity of an RR series (seconds); needs at least 3 intervals."""
    rr = np.asarray(rr, dtype=np.float64)
    if rr.size < 3 or (rr <= 0).any():
        raise ValueError("an RR series needs at least 3 positive intervals")
    mean = float(rr.mean())
    successive = np.diff(rr)
    turns = int(np.sum(successive[:-1] * successive[1:] < 0))
    expected_turns = 2 * (rr.size - 2) / 3
    return RhythmFeatures(
        heart_rate=60.0 / float(np.median(rr)),
        beats=beats if beats is not None else rr.size + 1,
        rr_cv=float(rr.std()) / mean,
        rr_nrmssd=float(np.sqrt(np.mean(successive**2))) / mean,
        turning_point_ratio=turns / expected_turns,
    )


def af_probability(features: RhythmFeatures) -> float:
    """The AF-screen score in percent: the logistic of the documented coefficients."""
    z = INTERCEPT + sum(c * getattr(features, name) for name, c in COEFFICIENTS.items())
    return float(100.0 / (1.0 + np.exp(-z)))


def screen_row(row: npt.NDArray[np.float64]) -> tuple[float, int, list[float]]:
    """(score %, band, FEATURES row) of one ECG row of ``N_SAMPLES`` in mV."""
    return _screen(row, band_pass(row[np.newaxis, :])[0])


def _unreadable(beats: int) -> tuple[float, int, list[float]]:
    """An unreadable row: score 0, band 2, features 0 but the beat count."""
    return 0.0, BAND_UNREADABLE, [0.0, float(beats), 0.0, 0.0, 0.0]


def _screen(row: npt.NDArray[Any], filtered: npt.NDArray[Any]) -> tuple[float, int, list[float]]:
    if float(np.ptp(row)) < MIN_AMPLITUDE_MV:
        return _unreadable(0)
    energy = integrated_energy(filtered[np.newaxis, :])[0]
    peaks = r_peaks(filtered, energy)
    if peaks.size < MIN_BEATS:
        return _unreadable(int(peaks.size))
    # The energy at R peaks must stand out of the signal's typical energy (QRS, not noise).
    if float(np.median(energy[peaks])) < MIN_PEAK_TO_BASELINE * float(np.median(energy)):
        return _unreadable(int(peaks.size))
    features = rr_features(np.diff(peaks) / SAMPLE_RATE_HZ, beats=int(peaks.size))
    low, high = HEART_RATE_RANGE
    if not low <= features.heart_rate <= high:
        return _unreadable(int(peaks.size))
    score = af_probability(features)
    band = BAND_IRREGULAR if score >= IRREGULAR_FROM_PERCENT else BAND_REGULAR
    return score, band, features.as_row()


def screen(
    ecg: npt.NDArray[Any],
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int32], npt.NDArray[np.float32]]:
    """Every row: (SCORE float32 [n, 1], RHYTHM_BAND int32 [n, 1], FEATURES float32 [n, 5])."""
    batch = check_ecg(ecg)
    filtered = band_pass(batch)
    rows = [_screen(batch[i], filtered[i]) for i in range(batch.shape[0])]
    scores = np.asarray([r[0] for r in rows], dtype=np.float32).reshape(-1, 1)
    bands = np.asarray([r[1] for r in rows], dtype=np.int32).reshape(-1, 1)
    features = np.asarray([r[2] for r in rows], dtype=np.float32).reshape(-1, N_FEATURES)
    return scores, bands, features


def _pb_utils() -> Any:
    """Triton's python backend utilities; only present inside the Triton python backend."""
    return importlib.import_module("triton_python_backend_utils")


class TritonPythonModel:
    """Triton entry point: the rhythm screen of every row of every request."""

    def initialize(self, args: dict[str, str]) -> None:
        """Bind the backend utilities (called once per model instance)."""
        self.pb = _pb_utils()

    def execute(self, requests: list[Any]) -> list[Any]:
        """Screen all requests' rows in one pass; a request with bad values gets an error."""
        pb = self.pb
        responses: list[Any] = [None] * len(requests)
        good: list[int] = []
        batches: list[npt.NDArray[Any]] = []
        for i, request in enumerate(requests):
            try:
                batches.append(check_ecg(pb.get_input_tensor_by_name(request, INPUT).as_numpy()))
            except ValueError as exc:
                error = pb.TritonError(str(exc))
                responses[i] = pb.InferenceResponse(output_tensors=[], error=error)
            else:
                good.append(i)
        if good:
            sizes = np.cumsum([len(b) for b in batches])[:-1]
            results = screen(np.concatenate(batches))
            per_request = zip(*(np.split(r, sizes) for r in results), strict=True)
            for i, arrays in zip(good, per_request, strict=True):
                tensors = [pb.Tensor(name, a) for name, a in zip(OUTPUTS, arrays, strict=True)]
                responses[i] = pb.InferenceResponse(output_tensors=tensors)
        return responses

    def finalize(self) -> None:
        """Nothing to release."""
