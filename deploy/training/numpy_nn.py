"""What the numpy CNN training scripts share: the classifier head, Adam, ONNX and the outputs.

train_ecg_cnn.py (1-D) and train_chest_cnn.py (2-D) keep their data, their convolution blocks
(forward and backward) and their model cards; this module has the rest, written once:

- the head on the last block's output ``h`` [B, cells, C]: global average and global max pooling
  (concatenated), a dense layer, softmax (``head_forward``), and the mean cross-entropy with its
  gradients back to ``h`` (``head_backward``);
- Adam on shuffled mini-batches (``train``), prediction in chunks (``predict``);
- the ONNX graph's standardisation, conv-block and head nodes, and the model around them;
- the checks a model must pass before it is written (onnxruntime agrees, fixtures classified),
  the held-out summaries (confusion matrix, log loss) and the card's tables;
- writing ``1/model.onnx``, ``metrics.json`` (with the model's sha256) and ``MODEL_CARD.md``.

Every function computes exactly what the scripts computed inline before (same operations in the
same order), so the committed models stay byte-identical.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[2]
OUTPUT = "PROBABILITIES"
OPSET = 17
IR_VERSION = 8  # the IR version of opset 17 (onnx 1.12), for older onnxruntime builds
ONNX_TOLERANCE = 1e-5  # onnxruntime vs the numpy forward pass, on probabilities

Array = npt.NDArray[np.floating[Any]]
Params = dict[str, Array]
Float = type[np.floating[Any]]
Labels = npt.NDArray[np.int64]
LossAndGradients = Callable[[Params, Array, Labels], tuple[float, Params]]


class HeadCache(NamedTuple):
    """What ``head_backward`` needs from ``head_forward``."""

    shape: tuple[int, ...]  # of h [B, cells, C]
    argmax: npt.NDArray[np.intp]  # the cell of each channel's maximum [B, C]
    features: Array  # [B, 2C]: averages, then maxima


class ModelFiles(NamedTuple):
    """A model folder's files that a training script writes."""

    script: str  # the training script, relative to the repository root
    onnx: Path
    metrics: Path
    card: Path


def model_files(model: str, script: str) -> ModelFiles:
    """The files of deploy/triton/models/``model`` (``config.pbtxt`` beside them is by hand)."""
    folder = ROOT / "deploy" / "triton" / "models" / model
    return ModelFiles(
        script, folder / "1" / "model.onnx", folder / "metrics.json", folder / "MODEL_CARD.md"
    )


# --- the network's shared parts ------------------------------------------------------------------


def init_params(
    rng: np.random.Generator, convs: Sequence[tuple[int, ...]], classes: int, dtype: Float
) -> Params:
    """He-initialised weights, drawn in this order from ``rng``.

    ``conv{i}_w`` of shape ``convs[i]`` ([out, in, *kernel], as ONNX Conv) and ``conv{i}_b``
    (zeros) for each block, then the head's ``dense_w`` [2C, K] (average and max features of the
    last block's C channels) and ``dense_b`` [K] (zeros).
    """
    params: Params = {}
    for i, shape in enumerate(convs):
        scale = np.sqrt(2.0 / math.prod(shape[1:]))
        params[f"conv{i}_w"] = (scale * rng.standard_normal(shape)).astype(dtype)
        params[f"conv{i}_b"] = np.zeros(shape[0], dtype=dtype)
    channels = convs[-1][0]
    scale = np.sqrt(1.0 / (2 * channels))
    params["dense_w"] = (scale * rng.standard_normal((2 * channels, classes))).astype(dtype)
    params["dense_b"] = np.zeros(classes, dtype=dtype)
    return params


def head_forward(params: Params, h: Array) -> tuple[Array, HeadCache]:
    """Class probabilities [B, K] of the last block's output ``h`` [B, cells, C]."""
    argmax = h.argmax(axis=1)
    features = np.concatenate([h.mean(axis=1), h.max(axis=1)], axis=1)
    logits = features @ params["dense_w"] + params["dense_b"]
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True), HeadCache(h.shape, argmax, features)


def log_loss(probabilities: Array, labels: Labels) -> float:
    """Mean cross-entropy of ``probabilities`` [N, K] against ``labels``."""
    picked = probabilities[np.arange(len(labels)), labels]
    return float(-np.mean(np.log(np.maximum(picked, 1e-12))))


def head_backward(
    params: Params, probabilities: Array, labels: Labels, cache: HeadCache
) -> tuple[float, Params, Array]:
    """(mean cross-entropy, the dense layer's gradients, d_h [B, cells, C])."""
    batch = probabilities.shape[0]
    loss = log_loss(probabilities, labels)
    d_logits = probabilities.copy()
    d_logits[np.arange(batch), labels] -= 1
    d_logits /= batch
    grads: Params = {
        "dense_w": cache.features.T @ d_logits,
        "dense_b": d_logits.sum(axis=0),
    }
    d_features = d_logits @ params["dense_w"].T
    cells, channels = cache.shape[1], cache.shape[2]
    d_h = np.broadcast_to(d_features[:, np.newaxis, :channels] / cells, cache.shape).copy()
    np.put_along_axis(
        d_h,
        cache.argmax[:, np.newaxis, :],
        np.take_along_axis(d_h, cache.argmax[:, np.newaxis, :], axis=1)
        + d_features[:, np.newaxis, channels:],
        axis=1,
    )
    return loss, grads, d_h


class Schedule(NamedTuple):
    """How ``train`` runs: epochs, mini-batch size, Adam's learning rate and the seed."""

    epochs: int
    batch: int
    learning_rate: float
    seed: int


def train(
    x: npt.NDArray[np.float32],
    labels: Labels,
    init_params: Callable[[np.random.Generator], Params],
    loss_and_gradients: LossAndGradients,
    schedule: Schedule,
) -> tuple[Params, list[float]]:
    """Adam on shuffled mini-batches, the learning rate halved for the last third of the epochs.

    One generator seeded by ``schedule.seed`` draws the initial weights, then each epoch's
    order. Returns the weights and each epoch's mean loss.
    """
    rng = np.random.default_rng(schedule.seed)
    params = init_params(rng)
    first = {k: np.zeros_like(v) for k, v in params.items()}
    second = {k: np.zeros_like(v) for k, v in params.items()}
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    step = 0
    history: list[float] = []
    epochs = schedule.epochs
    for epoch in range(epochs):
        rate = schedule.learning_rate * (0.5 if epoch >= epochs * 2 // 3 else 1.0)
        order = rng.permutation(x.shape[0])
        losses = []
        for start in range(0, len(order), schedule.batch):
            batch = order[start : start + schedule.batch]
            loss, grads = loss_and_gradients(params, x[batch], labels[batch])
            losses.append(loss)
            step += 1
            for k, g in grads.items():
                first[k] = beta1 * first[k] + (1 - beta1) * g
                second[k] = beta2 * second[k] + (1 - beta2) * g * g
                m_hat = first[k] / (1 - beta1**step)
                v_hat = second[k] / (1 - beta2**step)
                params[k] = (params[k] - rate * m_hat / (np.sqrt(v_hat) + eps)).astype(np.float32)
        history.append(float(np.mean(losses)))
        print(f"  epoch {epoch + 1:>2}/{epochs} loss {history[-1]:.4f}")
    return params, history


def predict(
    forward: Callable[[Params, Array], tuple[Array, list[Any]]],
    params: Params,
    x: Array,
    batch: int = 256,
) -> npt.NDArray[np.float32]:
    """Probabilities [N, K] of ``forward`` in chunks of ``batch`` inputs."""
    return np.concatenate(
        [forward(params, x[i : i + batch])[0] for i in range(0, x.shape[0], batch)]
    ).astype(np.float32)


def weight_count(params: Params) -> int:
    """How many numbers the network learns."""
    return sum(int(np.prod(v.shape)) for v in params.values())


# --- ONNX ----------------------------------------------------------------------------------------


def initializers(params: Params) -> list[onnx.TensorProto]:
    """The weights as FP32 initializers named as the parameters."""
    return [
        numpy_helper.from_array(np.asarray(v, dtype=np.float32), name=k) for k, v in params.items()
    ]


def standardise_nodes(source: str, axes: list[int]) -> list[onnx.NodeProto]:
    """``standardised`` = (source - mean) / sqrt(var + eps) over ``axes`` (eps: an initializer)."""
    return [
        helper.make_node("ReduceMean", [source], ["mean"], axes=axes, keepdims=1),
        helper.make_node("Sub", [source, "mean"], ["centered"]),
        helper.make_node("Mul", ["centered", "centered"], ["squared"]),
        helper.make_node("ReduceMean", ["squared"], ["variance"], axes=axes, keepdims=1),
        helper.make_node("Add", ["variance", "eps"], ["variance_eps"]),
        helper.make_node("Sqrt", ["variance_eps"], ["scale"]),
        helper.make_node("Div", ["centered", "scale"], ["standardised"]),
    ]


def conv_block_nodes(i: int, previous: str, pool: list[int], **conv: Any) -> list[onnx.NodeProto]:
    """Block ``i``: Conv (attributes ``conv``) + Relu + MaxPool (``pool``, stride ``pool``)."""
    return [
        helper.make_node("Conv", [previous, f"conv{i}_w", f"conv{i}_b"], [f"conv{i}"], **conv),
        helper.make_node("Relu", [f"conv{i}"], [f"relu{i}"]),
        helper.make_node("MaxPool", [f"relu{i}"], [f"pool{i}"], kernel_shape=pool, strides=pool),
    ]


def head_nodes(previous: str) -> list[onnx.NodeProto]:
    """Global average and max pooling of ``previous``, concatenated, dense, softmax to OUTPUT."""
    return [
        helper.make_node("GlobalAveragePool", [previous], ["average"]),
        helper.make_node("GlobalMaxPool", [previous], ["maximum"]),
        helper.make_node("Concat", ["average", "maximum"], ["pooled"], axis=1),
        helper.make_node("Flatten", ["pooled"], ["features"], axis=1),
        helper.make_node("Gemm", ["features", "dense_w", "dense_b"], ["logits"]),
        helper.make_node("Softmax", ["logits"], [OUTPUT], axis=1),
    ]


def onnx_model(
    nodes: list[onnx.NodeProto],
    name: str,
    graph_input: onnx.ValueInfoProto,
    classes: int,
    weights: list[onnx.TensorProto],
    doc_string: str,
) -> onnx.ModelProto:
    """The checked model (opset OPSET, IR IR_VERSION) of ``nodes``, to OUTPUT FP32 [batch, K]."""
    graph = helper.make_graph(
        nodes,
        name,
        [graph_input],
        [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["batch", classes])],
        weights,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="medmesh",
        doc_string=doc_string,
    )
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model


# --- checks, metrics and the files ---------------------------------------------------------------


def check_onnx(model: onnx.ModelProto, input_name: str, x: Array, expected: Array) -> float:
    """Largest difference between onnxruntime's and the numpy forward pass's probabilities."""
    session = onnxruntime.InferenceSession(
        model.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    (onnx_p,) = session.run([OUTPUT], {input_name: np.asarray(x, dtype=np.float32)})
    difference = float(np.max(np.abs(np.asarray(onnx_p) - expected)))
    if difference > ONNX_TOLERANCE:
        raise RuntimeError(f"onnxruntime and the numpy forward pass differ by {difference:.2e}")
    return difference


def check_fixtures(
    fixture_p: dict[str, Array], wanted: dict[str, int], classes: tuple[str, ...]
) -> None:
    """Refuse a model that does not classify each fixture (name -> probabilities) as wanted."""
    width = max(len(name) for name in fixture_p) + 2
    for name, p in fixture_p.items():
        print(f"  {name:<{width}} {[round(float(v), 4) for v in p]}")
        if int(p.argmax()) != wanted[name]:
            raise RuntimeError(f"{name} is not classified {classes[wanted[name]]}")


def confusion(labels: Labels, predicted: npt.NDArray[np.intp], classes: int) -> Labels:
    """Counts [true class, predicted class]."""
    matrix = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(matrix, (labels, predicted), 1)
    return matrix


def print_confusion(classes: tuple[str, ...], matrix: Labels) -> None:
    """A confusion matrix on the console, one line per true class."""
    for name, row in zip(classes, matrix, strict=True):
        print(f"    {name:<10} {row.tolist()}")


def confusion_table(classes: tuple[str, ...], matrix: Labels) -> str:
    """A confusion matrix as a Markdown table, rows true class, columns predicted."""
    return (
        "| true \\ predicted | "
        + " | ".join(classes)
        + " |\n"
        + "|---" * (len(classes) + 1)
        + "|\n"
        + "\n".join(
            f"| {name} | " + " | ".join(str(int(v)) for v in row) + " |"
            for name, row in zip(classes, matrix, strict=True)
        )
    )


def probability_rows(fixture_p: dict[str, Array], name_format: str = "{}") -> str:
    """Markdown table rows: each fixture's name (through ``name_format``) and probabilities."""
    return "\n".join(
        f"| {name_format.format(name)} | " + " | ".join(f"{v:.4f}" for v in p) + " |"
        for name, p in fixture_p.items()
    )


def reproduce_section(metrics: dict[str, Any]) -> str:
    """The model card's last section: how to get the same bytes again."""
    return (
        "## Reproduce\n\n`.tools/uv/bin/uv sync --group train`, then "
        f"`.venv/bin/python {metrics['training_script']}`: byte-identical output\n"
        f"(sha256 `{metrics['sha256']}`).\n"
    )


def write_model(
    files: ModelFiles,
    model: onnx.ModelProto,
    metrics: dict[str, Any],
    card: Callable[[dict[str, Any]], str],
) -> dict[str, Any]:
    """Write model.onnx, metrics.json (``metrics`` + script and sha256) and the card of them."""
    files.onnx.parent.mkdir(parents=True, exist_ok=True)
    files.onnx.write_bytes(model.SerializeToString())
    metrics = metrics | {
        "training_script": files.script,
        "sha256": hashlib.sha256(files.onnx.read_bytes()).hexdigest(),
    }
    files.metrics.write_text(json.dumps(metrics, indent=2) + "\n")
    files.card.write_text(card(metrics))
    print(f"wrote {files.onnx.relative_to(ROOT)} ({files.onnx.stat().st_size} bytes)")
    print(f"  sha256 {metrics['sha256']}")
    return metrics
