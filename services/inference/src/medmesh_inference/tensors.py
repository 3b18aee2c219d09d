"""Turning tasks into an input tensor and output tensors back into per-task results. No I/O."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import numpy.typing as npt

from medmesh_contracts.events import ModelInput, RunInference
from medmesh_contracts.modelspec import ModelSpec, WaveformSpec


class TaskInputError(ValueError):
    """A task's inputs do not fit the model's input tensor (a poison message, never retried)."""


def input_row(task: RunInference, spec: ModelSpec) -> list[float]:
    """One tensor row: the task's inputs in the spec's column order, in the spec's units.

    A scalar input fills one column; a waveform input fills ``waveform.samples`` columns with
    its samples, which must already be at the spec's rate and length (ingest made them so).
    """
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
        if column.waveform is not None:
            row.extend(_waveform_columns(given, column.waveform))
            continue
        if not np.isfinite(given.value):
            raise TaskInputError(f"input {column.name!r} is not a finite number")
        row.append(given.value)
    return row


def _waveform_columns(given: ModelInput, waveform: WaveformSpec) -> tuple[float, ...]:
    """A waveform input's samples, checked against the spec's length and rate."""
    samples = given.samples
    if samples is None:
        raise TaskInputError(f"input {given.name!r} is a waveform but carries no samples")
    if len(samples) != waveform.samples:
        raise TaskInputError(
            f"input {given.name!r} has {len(samples)} samples, the model expects {waveform.samples}"
        )
    if given.period_ms is None or not math.isclose(
        given.period_ms, waveform.period_ms, rel_tol=1e-6
    ):
        raise TaskInputError(
            f"input {given.name!r} is sampled every {given.period_ms} ms, the model expects "
            f"{waveform.period_ms:g} ms"
        )
    if not np.isfinite(np.asarray(samples, dtype=np.float64)).all():
        raise TaskInputError(f"input {given.name!r} holds a sample that is not a finite number")
    return samples


def input_batch(rows: Sequence[Sequence[float]]) -> npt.NDArray[np.float32]:
    """Rows stacked as the FP32 [n, k] tensor Triton expects (k: the spec's input width)."""
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
