"""deterioration v2: logistic regression on the NEWS2 vital signs, as a Triton python model.

The input ``VITALS`` is the same float32 batch ``[n, 7]`` as version 1 (columns: respiratory
rate /min, SpO2 %, supplemental oxygen 0/1, temperature Cel, systolic blood pressure mm[Hg],
heart rate /min, not alert 0/1). Each column becomes one or two physiologically shaped
deviation features (``FEATURES``: a reading inside the normal range gives 0, and the feature
grows linearly as the reading moves away from it, in the direction(s) that matter clinically):

====================  ========  ==================================================
feature               column    definition
====================  ========  ==================================================
rr_low                rr        max(0, 12 - rr)        bradypnoea, breaths/min below 12
rr_high               rr        max(0, rr - 20)        tachypnoea, breaths/min above 20
spo2_deficit          spo2      max(0, 96 - spo2)      % below 96
oxygen                oxygen    1 on supplemental oxygen, 0 on air
temp_low              temp      max(0, 36.0 - temp)    Cel below 36.0
temp_high             temp      max(0, temp - 38.0)    Cel above 38.0
sbp_low               sbp       max(0, 110 - sbp)      mm[Hg] below 110
sbp_high              sbp       max(0, sbp - 200)      mm[Hg] above 200
hr_low                hr        max(0, 50 - hr)        beats/min below 50
hr_high               hr        max(0, hr - 90)        beats/min above 90
not_alert             alert     1 when not alert (CVPU), 0 when alert
====================  ========  ==================================================

The coefficients and intercept live in ``weights.json`` beside this file, written by
``deploy/triton/fit_logistic.py`` (fitted on a synthetic cohort; see that script).

Outputs: ``SCORE`` the probability of deterioration in percent (0-100) ``[n, 1]``;
``RISK_BAND`` ``[n, 1]`` from the probability: below 5 % low (0), 5 % to below 15 % low-medium
(1), 15 % to below 40 % medium (2), 40 % and above high (3); ``CONTRIBUTIONS`` ``[n, 7]`` the
contribution of each input column to the log-odds (coefficient times feature, summed over the
column's features; the intercept is not included, so log-odds = intercept + row sum).

This file must load unchanged in NVIDIA's Triton container: it imports only numpy and the
standard library at module level, and ``triton_python_backend_utils`` lazily, so that unit
tests can import it without Triton.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

N_COLUMNS = 7
INPUT = "VITALS"
OUTPUTS = ("SCORE", "RISK_BAND", "CONTRIBUTIONS")
WEIGHTS_FILE = "weights.json"

# (feature name, input column it derives from); the order is the order of the coefficients.
FEATURES: tuple[tuple[str, int], ...] = (
    ("rr_low", 0),
    ("rr_high", 0),
    ("spo2_deficit", 1),
    ("oxygen", 2),
    ("temp_low", 3),
    ("temp_high", 3),
    ("sbp_low", 4),
    ("sbp_high", 4),
    ("hr_low", 5),
    ("hr_high", 5),
    ("not_alert", 6),
)
FEATURE_NAMES = tuple(name for name, _ in FEATURES)
# Probability thresholds (fractions) at which the bands low-medium, medium and high start.
BAND_THRESHOLDS = (0.05, 0.15, 0.40)


def check_vitals(vitals: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """The batch as float64 ``[n, 7]``; ValueError for a wrong shape or a non-finite value."""
    array = np.asarray(vitals, dtype=np.float64)
    if array.ndim != 2 or array.shape[1] != N_COLUMNS:
        raise ValueError(f"{INPUT} must have shape [n, {N_COLUMNS}], got {list(array.shape)}")
    bad = ~np.isfinite(array)
    if bad.any():
        rows, columns = np.nonzero(bad)
        raise ValueError(
            f"{INPUT} holds {int(bad.sum())} non-finite value(s) (NaN or infinite), first at "
            f"row {int(rows[0])} column {int(columns[0])}; send only measured values"
        )
    return array


def features(vitals: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """The deviation features of each row, float64 ``[n, len(FEATURES)]`` (see module doc)."""
    v = check_vitals(vitals)
    rr, spo2, oxygen, temp, sbp, hr, not_alert = (v[:, i] for i in range(N_COLUMNS))
    return np.stack(
        [
            np.maximum(0.0, 12.0 - rr),
            np.maximum(0.0, rr - 20.0),
            np.maximum(0.0, 96.0 - spo2),
            (oxygen >= 0.5).astype(np.float64),
            np.maximum(0.0, 36.0 - temp),
            np.maximum(0.0, temp - 38.0),
            np.maximum(0.0, 110.0 - sbp),
            np.maximum(0.0, sbp - 200.0),
            np.maximum(0.0, 50.0 - hr),
            np.maximum(0.0, hr - 90.0),
            (not_alert >= 0.5).astype(np.float64),
        ],
        axis=1,
    )


def column_matrix() -> npt.NDArray[Any]:
    """``[len(FEATURES), 7]`` 0/1 matrix summing feature contributions into input columns."""
    matrix = np.zeros((len(FEATURES), N_COLUMNS))
    for row, (_, column) in enumerate(FEATURES):
        matrix[row, column] = 1.0
    return matrix


def load_weights(path: Path) -> tuple[npt.NDArray[Any], float]:
    """(coefficients in ``FEATURES`` order, intercept) from a weights.json written by the fit."""
    weights = json.loads(path.read_text())
    if tuple(weights["features"]) != FEATURE_NAMES:
        raise ValueError(
            f"{path} has features {weights['features']}, this model computes {list(FEATURE_NAMES)}"
        )
    coefficients = np.asarray(weights["coefficients"], dtype=np.float64)
    return coefficients, float(weights["intercept"])


def predict(
    vitals: npt.NDArray[Any], coefficients: npt.NDArray[Any], intercept: float
) -> tuple[npt.NDArray[Any], npt.NDArray[Any], npt.NDArray[Any]]:
    """(probability % float32 [n, 1], band int32 [n, 1], log-odds per column float32 [n, 7])."""
    contributions = (features(vitals) * coefficients) @ column_matrix()
    log_odds = intercept + contributions.sum(axis=1)
    probability = 1.0 / (1.0 + np.exp(-log_odds))
    band = np.searchsorted(np.asarray(BAND_THRESHOLDS), probability, side="right")
    return (
        (100.0 * probability).astype(np.float32).reshape(-1, 1),
        band.astype(np.int32).reshape(-1, 1),
        contributions.astype(np.float32),
    )


def _pb_utils() -> Any:
    """Triton's python backend utilities; only present inside the Triton python backend."""
    return importlib.import_module("triton_python_backend_utils")


class TritonPythonModel:
    """Triton entry point: risk of every row of every request, one response per request."""

    def initialize(self, args: dict[str, str]) -> None:
        """Load the fitted weights of this version (called once per model instance)."""
        self.pb = _pb_utils()
        if "model_repository" in args and "model_version" in args:
            directory = Path(args["model_repository"]) / args["model_version"]
        else:
            directory = Path(__file__).resolve().parent
        self.coefficients, self.intercept = load_weights(directory / WEIGHTS_FILE)

    def execute(self, requests: list[Any]) -> list[Any]:
        """Score all requests in one vectorized pass; a request with bad values gets an error."""
        pb = self.pb
        responses: list[Any] = [None] * len(requests)
        good: list[int] = []
        batches: list[npt.NDArray[Any]] = []
        for i, request in enumerate(requests):
            try:
                batches.append(check_vitals(pb.get_input_tensor_by_name(request, INPUT).as_numpy()))
            except ValueError as exc:
                error = pb.TritonError(str(exc))
                responses[i] = pb.InferenceResponse(output_tensors=[], error=error)
            else:
                good.append(i)
        if good:
            sizes = np.cumsum([len(b) for b in batches])[:-1]
            results = predict(np.concatenate(batches), self.coefficients, self.intercept)
            per_request = zip(*(np.split(r, sizes) for r in results), strict=True)
            for i, arrays in zip(good, per_request, strict=True):
                tensors = [pb.Tensor(name, a) for name, a in zip(OUTPUTS, arrays, strict=True)]
                responses[i] = pb.InferenceResponse(output_tensors=tensors)
        return responses

    def finalize(self) -> None:
        """Nothing to release."""
