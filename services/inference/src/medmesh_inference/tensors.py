"""Turning tasks into an input tensor and output tensors back into per-task results. No I/O."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import numpy.typing as npt

from medmesh_contracts.events import RunInference
from medmesh_contracts.modelspec import ModelSpec


class TaskInputError(ValueError):
    """A task's inputs do not fit the model's input tensor (a poison message, never retried)."""


def input_row(task: RunInference, spec: ModelSpec) -> list[float]:
    """One tensor row: the task's inputs in the spec's column order, in the spec's units."""
    by_name = {i.name: i for i in task.request.inputs}
    row: list[float] = []
    for column in spec.inputs:
        given = by_name.get(column.name)
        if given is None:
            if column.required or column.default is None:
                raise TaskInputError(f"input {column.name!r} is missing")
            row.append(column.default)
            continue
        if given.unit != column.unit:
            raise TaskInputError(
                f"input {column.name!r} is in {given.unit!r}, the model expects {column.unit!r}"
            )
        if not np.isfinite(given.value):
            raise TaskInputError(f"input {column.name!r} is not a finite number")
        row.append(given.value)
    return row


def input_batch(rows: Sequence[Sequence[float]]) -> npt.NDArray[np.float32]:
    """Rows stacked as the FP32 [n, k] tensor Triton expects."""
    return np.asarray(rows, dtype=np.float32)


def split_outputs(
    outputs: Mapping[str, npt.NDArray[np.generic]], rows: int
) -> list[dict[str, tuple[float, ...]]]:
    """Per-row output values, flattened, for each output tensor of a batch of ``rows`` rows."""
    per_row: list[dict[str, tuple[float, ...]]] = [{} for _ in range(rows)]
    for name, tensor in outputs.items():
        if tensor.shape[0] != rows:
            raise ValueError(f"output {name} has {tensor.shape[0]} rows for a batch of {rows}")
        flat = tensor.reshape(rows, -1).astype(np.float64)
        for i in range(rows):
            per_row[i][name] = tuple(float(x) for x in flat[i])
    return per_row
