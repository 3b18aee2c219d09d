"""deterioration v1: NEWS2 (Royal College of Physicians 2017, SpO2 scale 1), a Triton python model.

The input ``VITALS`` is a float32 batch ``[n, 7]`` whose columns follow the model spec
(deploy/models/deterioration.yaml): respiratory rate /min, SpO2 %, supplemental oxygen (1 = on
oxygen, 0 = air), temperature Cel, systolic blood pressure mm[Hg], heart rate /min, not alert
(1 = new confusion, voice, pain or unresponsive; 0 = alert).

Outputs: ``SCORE`` the NEWS2 total ``[n, 1]``, ``RISK_BAND`` ``[n, 1]`` (0 low, 1 low-medium,
2 medium, 3 high) and ``CONTRIBUTIONS`` the NEWS2 points of each column ``[n, 7]``.

Non-integer readings are scored with the published integer bands read as thresholds
(respiratory rate 11.5 is above 11, so it scores like 12-20); temperature uses the published
one-decimal bands the same way (35.05 is above 35.0 and scores like 35.1-36.0). The two binary
columns count as 1 from 0.5 upwards.

This file must load unchanged in NVIDIA's Triton container: it imports only numpy and the
standard library at module level, and ``triton_python_backend_utils`` lazily, so that unit
tests can import it without Triton.
"""

from __future__ import annotations

import importlib
from typing import Any

import numpy as np
import numpy.typing as npt

N_COLUMNS = 7
INPUT = "VITALS"
OUTPUTS = ("SCORE", "RISK_BAND", "CONTRIBUTIONS")

BAND_LOW = 0
BAND_LOW_MEDIUM = 1
BAND_MEDIUM = 2
BAND_HIGH = 3


def _points(bands: list[tuple[npt.NDArray[Any], int]], otherwise: int) -> npt.NDArray[Any]:
    """Per row, the points of the first band whose condition holds, else ``otherwise``."""
    conditions = [condition for condition, _ in bands]
    choices = [float(points) for _, points in bands]
    return np.select(conditions, choices, default=float(otherwise))


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


def news2(vitals: npt.NDArray[Any]) -> tuple[npt.NDArray[Any], npt.NDArray[Any], npt.NDArray[Any]]:
    """NEWS2 of each row: (total float32 [n, 1], band int32 [n, 1], points float32 [n, 7])."""
    v = check_vitals(vitals)
    rr, spo2, oxygen, temp, sbp, hr, not_alert = (v[:, i] for i in range(N_COLUMNS))

    points = np.stack(
        [
            _points([(rr <= 8, 3), (rr <= 11, 1), (rr <= 20, 0), (rr <= 24, 2)], 3),
            _points([(spo2 <= 91, 3), (spo2 <= 93, 2), (spo2 <= 95, 1)], 0),
            np.where(oxygen >= 0.5, 2.0, 0.0),
            _points(
                [(temp <= 35.0, 3), (temp <= 36.0, 1), (temp <= 38.0, 0), (temp <= 39.0, 1)], 2
            ),
            _points([(sbp <= 90, 3), (sbp <= 100, 2), (sbp <= 110, 1), (sbp < 220, 0)], 3),
            _points(
                [(hr <= 40, 3), (hr <= 50, 1), (hr <= 90, 0), (hr <= 110, 1), (hr <= 130, 2)], 3
            ),
            np.where(not_alert >= 0.5, 3.0, 0.0),
        ],
        axis=1,
    )
    total = points.sum(axis=1)
    any_three = (points >= 3).any(axis=1)
    band = np.select(
        [total >= 7, total >= 5, any_three],
        [BAND_HIGH, BAND_MEDIUM, BAND_LOW_MEDIUM],
        default=BAND_LOW,
    )
    return (
        total.astype(np.float32).reshape(-1, 1),
        band.astype(np.int32).reshape(-1, 1),
        points.astype(np.float32),
    )


def _pb_utils() -> Any:
    """Triton's python backend utilities; only present inside the Triton python backend."""
    return importlib.import_module("triton_python_backend_utils")


class TritonPythonModel:
    """Triton entry point: NEWS2 of every row of every request, one response per request."""

    def initialize(self, args: dict[str, str]) -> None:
        """Bind the backend utilities (called once per model instance)."""
        self.pb = _pb_utils()

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
            results = news2(np.concatenate(batches))
            per_request = zip(*(np.split(r, sizes) for r in results), strict=True)
            for i, arrays in zip(good, per_request, strict=True):
                tensors = [pb.Tensor(name, a) for name, a in zip(OUTPUTS, arrays, strict=True)]
                responses[i] = pb.InferenceResponse(output_tensors=tensors)
        return responses

    def finalize(self) -> None:
        """Nothing to release."""
