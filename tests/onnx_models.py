"""Tiny ONNX models and Triton model folders for tests, built with onnx.helper.

``softmax_model`` is a linear classifier with a free batch dimension: ``X`` FP32 ``[n, width]``
-> ``LOGITS`` = X W + b (FP32 ``[n, classes]``), ``PROBS`` = softmax(LOGITS) (FP32
``[n, classes]``) and ``CLASS`` = argmax (INT64 ``[n, 1]``). ``onnx_model_folder`` writes it as a
Triton model folder for the onnxruntime backend (``platform: "onnxruntime_onnx"``), with one
``<version>/model.onnx`` per version (weights seeded by the version, so versions differ).

``metrics_numbers`` checks the shape of a committed model's metrics.json (deploy/triton/models);
``assert_cnn_gradients`` checks a numpy training script's backward pass (deploy/training) against
numerical gradients on a tiny network.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
from onnx import TensorProto, helper, numpy_helper

INPUT = "X"
OUTPUTS = ("LOGITS", "PROBS", "CLASS")
# An opset and IR version every onnxruntime this project uses reads.
OPSET = 17
IR_VERSION = 8


def softmax_model(
    width: int = 4, classes: int = 3, seed: int = 0, *, batch: int | None = None
) -> onnx.ModelProto:
    """The classifier as an ONNX model; ``batch`` fixes the first dimension (default: free)."""
    rng = np.random.default_rng(seed)
    weights = rng.normal(size=(width, classes)).astype(np.float32)
    bias = rng.normal(size=(classes,)).astype(np.float32)
    rows: int | str = batch if batch is not None else "n"
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", [INPUT, "W"], ["XW"]),
            helper.make_node("Add", ["XW", "B"], ["LOGITS"]),
            helper.make_node("Softmax", ["LOGITS"], ["PROBS"], axis=-1),
            helper.make_node("ArgMax", ["LOGITS"], ["CLASS"], axis=1, keepdims=1),
        ],
        "softmax",
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, [rows, width])],
        [
            helper.make_tensor_value_info("LOGITS", TensorProto.FLOAT, [rows, classes]),
            helper.make_tensor_value_info("PROBS", TensorProto.FLOAT, [rows, classes]),
            helper.make_tensor_value_info("CLASS", TensorProto.INT64, [rows, 1]),
        ],
        [numpy_helper.from_array(weights, "W"), numpy_helper.from_array(bias, "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


def onnx_config(
    name: str,
    *,
    width: int | str = 4,
    classes: int = 3,
    max_batch_size: int = 8,
    queue_delay_us: int = 2000,
) -> str:
    """The config.pbtxt of the classifier for Triton's onnxruntime backend (``width`` may be
    ``-1``: then Triton lets any width through and the model must refuse a wrong one)."""
    return f"""# A test classifier (tests/onnx_models.py), served by Triton's onnxruntime backend.
name: "{name}"
platform: "onnxruntime_onnx"
max_batch_size: {max_batch_size}
input [
  {{ name: "{INPUT}" data_type: TYPE_FP32 dims: [ {width} ] }}
]
output [
  {{ name: "LOGITS" data_type: TYPE_FP32 dims: [ {classes} ] }},
  {{ name: "PROBS" data_type: TYPE_FP32 dims: [ {classes} ] }},
  {{ name: "CLASS" data_type: TYPE_INT64 dims: [ 1 ] }}
]
version_policy: {{ all {{}} }}
dynamic_batching {{ max_queue_delay_microseconds: {queue_delay_us} }}
instance_group [ {{ kind: KIND_CPU count: 1 }} ]
"""


def onnx_model_folder(
    repository: Path,
    name: str,
    versions: Sequence[int] = (1,),
    *,
    width: int = 4,
    config_width: int | None = None,
    classes: int = 3,
    max_batch_size: int = 8,
    queue_delay_us: int = 2000,
) -> Path:
    """Write ``repository/name``: config.pbtxt and ``<v>/model.onnx`` for each version."""
    folder = repository / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.pbtxt").write_text(
        onnx_config(
            name,
            width=config_width if config_width is not None else width,
            classes=classes,
            max_batch_size=max_batch_size,
            queue_delay_us=queue_delay_us,
        )
    )
    for version in versions:
        add_version(folder, version, width=width, classes=classes)
    return folder


def add_version(folder: Path, version: int, *, width: int = 4, classes: int = 3) -> Path:
    """Write ``folder/<version>/model.onnx`` (weights seeded by the version)."""
    target = folder / str(version) / "model.onnx"
    target.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(softmax_model(width, classes, seed=version), target)
    return target


def reference_outputs(path: Path, x: npt.NDArray[Any]) -> dict[str, npt.NDArray[Any]]:
    """What onnxruntime's own InferenceSession computes for ``X`` = ``x`` (on the CPU)."""
    onnxruntime: Any = importlib.import_module("onnxruntime")  # untyped (no py.typed)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, {INPUT: x}), strict=True))


def rows(n: int, width: int = 4, seed: int = 7) -> npt.NDArray[np.float32]:
    """``n`` random input rows (FP32)."""
    return np.random.default_rng(seed).normal(size=(n, width)).astype(np.float32)


def metrics_numbers(metrics: dict[str, Any]) -> dict[str, int | float]:
    """metrics.json's numbers, once its shape is checked.

    snake_case names; numbers only, but for the checksum and the training script's path; training
    and held-out row counts above zero.
    """
    assert all(re.fullmatch(r"[a-z][a-z0-9_]*", key) for key in metrics)
    texts = {k for k, v in metrics.items() if isinstance(v, str)}
    assert texts == {"sha256", "training_script"}
    numbers = {k: v for k, v in metrics.items() if k not in texts}
    assert all(isinstance(v, int | float) and not isinstance(v, bool) for v in numbers.values())
    assert numbers["train_rows"] > 0
    assert numbers["test_rows"] > 0
    return numbers


def assert_cnn_gradients(
    cnn: ModuleType,
    blocks: Sequence[Any],
    x_shape: tuple[int, ...],
    labels: Sequence[int],
) -> None:
    """Every gradient of ``cnn.loss_and_gradients`` equals central differences to 1e-6 (relative).

    On the script's network with ``blocks`` (and its classes), in float64: random weights, the
    biases non-zero too so that every path counts, and random inputs of ``x_shape``.
    """
    rng = np.random.default_rng(0)
    params = {
        k: v + 0.1 * rng.standard_normal(v.shape)
        for k, v in cnn.init_params(rng, blocks, np.float64).items()
    }
    x = rng.standard_normal(x_shape)
    y = np.array(labels)
    _, gradients = cnn.loss_and_gradients(params, x, y, blocks)
    assert set(gradients) == set(params)
    step = 1e-6
    for name, value in params.items():
        numerical = np.zeros_like(value)
        for index in np.ndindex(value.shape):
            kept = value[index]
            value[index] = kept + step
            up, _ = cnn.loss_and_gradients(params, x, y, blocks)
            value[index] = kept - step
            down, _ = cnn.loss_and_gradients(params, x, y, blocks)
            value[index] = kept
            numerical[index] = (up - down) / (2 * step)
        scale = max(float(np.abs(numerical).max()), 1e-8)
        assert float(np.abs(numerical - gradients[name]).max()) / scale < 1e-6, name
