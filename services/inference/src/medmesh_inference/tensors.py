"""Turning tasks into input tensors and output tensors back into per-task results. No I/O.

A version's spec names its input tensors and how each is fed (``InputTensor.feed``): a
``features`` tensor holds one value per named scalar input, a ``waveform`` tensor the samples of
one signal, an ``image`` tensor the preprocessed pixels of one image (fetched and prepared before,
``image_inputs``; passed in as ``images``). Each tensor of a batch is ``[rows, *shape]`` in its
declared datatype.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from medmesh_contracts.events import ModelInput, RunInference
from medmesh_contracts.modelspec import InputSpec, InputTensor, ModelSpec, VersionSpec, WaveformSpec
from medmesh_inference.imaging import ImageRefusedError, PreparedImage

# numpy's type for each Triton datatype an input tensor may have.
INPUT_DTYPES: dict[str, type[np.floating[Any]]] = {
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
}

Row = Sequence[float] | npt.NDArray[np.float32]
Rows = dict[str, Row]
# A task's prepared images by input name; a refused image is its refusal.
Images = Mapping[str, PreparedImage | ImageRefusedError]


class TaskInputError(ValueError):
    """A task's inputs do not fit the model's input tensors (a poison message, never retried)."""


def input_rows(
    task: RunInference, spec: ModelSpec, version: VersionSpec, images: Images | None = None
) -> Rows:
    """One row per input tensor of ``version``: the task's inputs in the tensor's order, in the
    spec's units. A waveform's samples must already be at the spec's rate and length (ingest
    made them so); an image tensor's row is its input's prepared image in ``images``."""
    by_name = {i.name: i for i in task.request.inputs}
    rows: Rows = {}
    for tensor in version.triton.inputs:
        row = (
            _image_row(tensor, spec, by_name, images or {})
            if tensor.feed == "image"
            else _tensor_row(tensor, spec, by_name)
        )
        # Finite in float64 is not enough: 1e308 becomes inf in an FP32 tensor.
        limit = float(np.finfo(INPUT_DTYPES[tensor.datatype]).max)
        if len(row) and float(np.abs(np.asarray(row, dtype=np.float64)).max()) > limit:
            raise TaskInputError(
                f"input tensor {tensor.name} holds a value beyond the {tensor.datatype} range"
            )
        rows[tensor.name] = row
    return rows


def _tensor_row(
    tensor: InputTensor, spec: ModelSpec, given: Mapping[str, ModelInput]
) -> list[float]:
    row: list[float] = []
    for name in tensor.inputs:
        column = spec.input(name)
        found = given.get(name)
        if found is None:
            if column.required or column.default is None:
                raise TaskInputError(f"input {name!r} is missing")
            row.append(column.default)
            continue
        _check_unit(found, column)
        if column.waveform is not None:
            row.extend(_waveform_columns(found, column.waveform))
            continue
        if not np.isfinite(found.value):
            raise TaskInputError(f"input {name!r} is not a finite number")
        row.append(found.value)
    return row


def _image_row(
    tensor: InputTensor, spec: ModelSpec, given: Mapping[str, ModelInput], images: Images
) -> npt.NDArray[np.float32]:
    """The prepared pixels of the image tensor's one input, flattened."""
    (name,) = tensor.inputs
    found = given.get(name)
    if found is None or found.image is None:
        raise TaskInputError(f"input {name!r} is an image but the task references none")
    _check_unit(found, spec.input(name))
    prepared = images.get(name)
    if prepared is None:
        raise TaskInputError(f"image input {name!r} was not prepared")
    if isinstance(prepared, ImageRefusedError):
        raise TaskInputError(f"image input {name!r}: {prepared}")
    if not np.isfinite(prepared.tensor).all():
        raise TaskInputError(f"image input {name!r} holds a value that is not a finite number")
    return prepared.tensor.ravel()


def _check_unit(given: ModelInput, column: InputSpec) -> None:
    if given.unit != column.unit:
        raise TaskInputError(
            f"input {column.name!r} is in {given.unit!r}, the model expects {column.unit!r}"
        )


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


def input_batch(version: VersionSpec, rows: Sequence[Rows]) -> dict[str, npt.NDArray[np.generic]]:
    """Rows stacked per input tensor as ``[n, *shape]`` in the tensor's declared datatype."""
    return {
        tensor.name: np.asarray(
            [row[tensor.name] for row in rows], dtype=INPUT_DTYPES[tensor.datatype]
        ).reshape(len(rows), *tensor.shape)
        for tensor in version.triton.inputs
    }


def split_outputs(
    outputs: Mapping[str, npt.NDArray[np.generic]], rows: int
) -> list[dict[str, tuple[float, ...]]]:
    """Per-row output values, flattened, for each output tensor of a batch of ``rows`` rows."""
    per_row: list[dict[str, tuple[float, ...]]] = [{} for _ in range(rows)]
    for name, tensor in outputs.items():
        if tensor.ndim == 0 or tensor.shape[0] != rows:
            raise ValueError(f"output {name} has shape {list(tensor.shape)} for a batch of {rows}")
        flat = tensor.reshape(rows, -1).astype(np.float64)
        for i in range(rows):
            per_row[i][name] = tuple(float(x) for x in flat[i])
    return per_row
