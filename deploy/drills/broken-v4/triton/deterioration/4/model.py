"""deterioration v4 (DRILL, deploy/drills/broken-v4): a version with a deployment defect.

Built for a batch ``VITALS`` of 8 columns (the seven NEWS2 vital signs plus lactate), while the
model spec feeds 7: every request is answered with an error naming the shape, as a model whose
code and feature pipeline disagree is in production. It exists so that the rollout controller
can be watched rolling a bad version back (README, "roll out a new version").

Imports only numpy and the standard library at module level (see deterioration/1/model.py).
"""

from __future__ import annotations

import importlib
from typing import Any

import numpy as np
import numpy.typing as npt

INPUT = "VITALS"
EXPECTED_COLUMNS = 8


def check_columns(vitals: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """The batch as float64 ``[n, 8]``; ValueError for any other shape (always, with the spec)."""
    array = np.asarray(vitals, dtype=np.float64)
    if array.ndim != 2 or array.shape[1] != EXPECTED_COLUMNS:
        raise ValueError(
            f"{INPUT} must have shape [n, {EXPECTED_COLUMNS}] (vital signs and lactate), "
            f"got {list(array.shape)}"
        )
    return array


class TritonPythonModel:
    """Triton entry point: every request whose batch does not have 8 columns gets an error."""

    def initialize(self, args: dict[str, str]) -> None:
        """Bind the backend utilities (called once per model instance)."""
        self.pb = importlib.import_module("triton_python_backend_utils")

    def execute(self, requests: list[Any]) -> list[Any]:
        """One error response per request: the spec's 7 columns are never what v4 expects."""
        pb = self.pb
        responses: list[Any] = []
        for request in requests:
            try:
                check_columns(pb.get_input_tensor_by_name(request, INPUT).as_numpy())
            except ValueError as exc:
                responses.append(
                    pb.InferenceResponse(output_tensors=[], error=pb.TritonError(str(exc)))
                )
            else:
                error = pb.TritonError("lactate model not implemented in this drill")
                responses.append(pb.InferenceResponse(output_tensors=[], error=error))
        return responses

    def finalize(self) -> None:
        """Nothing to release."""
