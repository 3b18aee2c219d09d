"""Train ecg-rhythm-cnn: a small 1-D convolutional network in numpy, exported as ONNX.

Run from the repository root, with the ``train`` dependency group installed:
``.venv/bin/python deploy/training/train_ecg_cnn.py``. It writes, under
deploy/triton/models/ecg-rhythm-cnn/: ``1/model.onnx``, ``metrics.json`` and ``MODEL_CARD.md``
(``config.pbtxt`` beside them is written by hand). numpy only (no deep-learning framework):
im2col convolutions, a hand-written backward pass and Adam; fixed seeds and one BLAS thread, so
re-running gives byte-identical files.

Data: 10 s of one ECG lead at 250 Hz in mV (2500 samples), the row ingest sends (README, "A
second model"). Classes, in the order of the output columns:

- 0 ``regular``: ``synthetic_ecg("sinus", ...)`` of tests/fixtures/fhir/make_ecg_fixtures.py;
- 1 ``irregular``: ``synthetic_ecg("af", ...)``;
- 2 ``unreadable``: made here, a flat line, heavy (white or smoothed) noise, or baseline wander
  alone.

The generator is imported, not changed; every ECG has its own seed (``generator_seed``), far
from the fixtures' (11-14). Each ECG varies through the generator's own parameters: the heart
rate by a tempo factor ``s`` (generated at ``250 s`` Hz over ``10 / s`` s and read as 250 Hz, so
every interval is divided by ``s``), the noise by ``noise_mv``; and the amplitude by a gain on
the result.

The network (``forward``), on a row ``x`` of 2500 samples:

``z = (x - mean(x)) / sqrt(var(x) + EPS)`` (in the graph), then three blocks of Conv1d (kernel 7,
"same" padding) + ReLU + MaxPool, global average and global max pooling over time (concatenated),
a dense layer and softmax. The loss is the mean cross-entropy.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import time
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[2]
GENERATOR = ROOT / "tests" / "fixtures" / "fhir" / "make_ecg_fixtures.py"
MODEL_DIR = ROOT / "deploy" / "triton" / "models" / "ecg-rhythm-cnn"
ONNX_PATH = MODEL_DIR / "1" / "model.onnx"
METRICS_PATH = MODEL_DIR / "metrics.json"
CARD_PATH = MODEL_DIR / "MODEL_CARD.md"
SCRIPT = "deploy/training/train_ecg_cnn.py"

INPUT = "ECG"
OUTPUT = "PROBABILITIES"
CLASSES = ("regular", "irregular", "unreadable")
RHYTHM_CLASS = {"sinus": 0, "af": 1}  # the generator's rhythms
RATE_HZ = 250.0
DURATION_S = 10.0
N_SAMPLES = 2500
EPS = 1e-3  # mV^2: a flat line stays near 0 after standardisation instead of blowing up noise
OPSET = 17
ONNX_TOLERANCE = 1e-5  # onnxruntime vs the numpy forward pass, on probabilities
IR_VERSION = 8  # the IR version of opset 17 (onnx 1.12), for older onnxruntime builds

# (out channels, kernel, stride, max-pool size) of each convolution block.
Blocks = tuple[tuple[int, int, int, int], ...]
BLOCKS: Blocks = ((8, 7, 2, 2), (16, 7, 1, 4), (32, 7, 1, 2))

SEED = 20260101
SEED_BASE = 1_000_000  # generator seeds; the fixtures use 11-14 (and 1011-1014 internally)
TRAIN_PER_CLASS = 900
TEST_PER_CLASS = 200
EPOCHS = 14
BATCH = 32
LEARNING_RATE = 2e-3
TEMPO = (0.8, 1.25)
NOISE_MV = (0.005, 0.06)
GAIN = (0.6, 1.6)
# A second held-out set, noisier than any training ECG: how the accuracy degrades off-distribution.
NOISY_MV = (0.08, 0.15)

Array = npt.NDArray[np.floating[Any]]
Params = dict[str, Array]


def load_file(path: Path, name: str) -> ModuleType:
    """The standalone script at ``path``, imported as ``name``."""
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- data ----------------------------------------------------------------------------------------


def rhythm_ecg(
    generator: ModuleType, rhythm: str, seed: int, noise_mv: tuple[float, float] = NOISE_MV
) -> npt.NDArray[np.float64]:
    """A sinus or AF ECG from the fixture generator, with tempo, noise and gain drawn by ``seed``.

    The generator draws from ``default_rng(seed)`` and ``default_rng(seed + 1000)``; the tempo,
    noise and gain from ``default_rng([seed, 1])``, another stream.
    """
    rng = np.random.default_rng([seed, 1])
    tempo = rng.uniform(*TEMPO)
    noise = rng.uniform(*noise_mv)
    gain = rng.uniform(*GAIN)
    signal = generator.synthetic_ecg(
        rhythm, seed, rate_hz=RATE_HZ * tempo, duration_s=DURATION_S / tempo, noise_mv=noise
    )
    row = gain * np.asarray(signal, dtype=np.float64)
    if row.shape != (N_SAMPLES,):
        raise ValueError(f"generator gave {row.shape} samples")
    return row


def unreadable_ecg(seed: int) -> npt.NDArray[np.float64]:
    """No interpretable ECG: a flat line, heavy noise or baseline wander alone (1 in 3 each)."""
    rng = np.random.default_rng([seed, 2])
    t = np.arange(N_SAMPLES) / RATE_HZ
    kind = rng.integers(3)
    if kind == 0:  # flat: a constant, possibly with ADC-level noise, quantized to 2.5 uV
        row = rng.uniform(-0.5, 0.5) + rng.choice([0.0, 0.002, 0.01]) * rng.standard_normal(t.size)
        return np.asarray(np.round(row / 0.0025) * 0.0025, dtype=np.float64)
    if kind == 1:  # heavy noise, white or smoothed (muscle-like), with or without wander
        noise = rng.standard_normal(t.size + 8)
        width = int(rng.integers(1, 6))
        noise = np.convolve(noise, np.ones(width) / np.sqrt(width), mode="same")[4:-4]
        wander = rng.uniform(0, 0.3) * np.sin(2 * np.pi * rng.uniform(0.1, 0.5) * t)
        return np.asarray(rng.uniform(0.15, 1.0) * noise + wander, dtype=np.float64)
    row = np.zeros(t.size)  # baseline wander only, a little noise
    for _ in range(int(rng.integers(1, 4))):
        frequency, phase = rng.uniform(0.05, 0.8), rng.uniform(0, 2 * np.pi)
        row += rng.uniform(0.1, 1.0) * np.sin(2 * np.pi * frequency * t + phase)
    return np.asarray(row + rng.uniform(0.0, 0.03) * rng.standard_normal(t.size), dtype=np.float64)


def generator_seed(index: int) -> int:
    """The seed of the ``index``-th synthetic ECG: blocks of 1000 seeds, 1000 apart.

    ``synthetic_ecg(rhythm, seed)`` also draws from ``seed + 1000``, which thus never is another
    ECG's seed.
    """
    return SEED_BASE + index + 1000 * (index // 1000)


def dataset(
    generator: ModuleType,
    per_class: int,
    first_index: int,
    noise_mv: tuple[float, float] = NOISE_MV,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """(rows [3 per_class, 2500] float32, labels): ECGs ``first_index`` .. ``+ 3 per_class - 1``."""
    rows: list[npt.NDArray[np.float64]] = []
    labels: list[int] = []
    for i in range(first_index, first_index + 3 * per_class, 3):
        rows += [
            rhythm_ecg(generator, "sinus", generator_seed(i), noise_mv),
            rhythm_ecg(generator, "af", generator_seed(i + 1), noise_mv),
            unreadable_ecg(generator_seed(i + 2)),
        ]
        labels += [0, 1, 2]
    return np.stack(rows).astype(np.float32), np.asarray(labels, dtype=np.int64)


def check_seeds(generator: ModuleType, count: int) -> None:
    """Refuse to train if the first ``count`` ECGs' generator streams meet the fixtures' ones."""
    fixtures = {seed + d for _, _, seed in generator.FIXTURES.values() for d in (0, 1000)}
    ours = {generator_seed(i) + d for i in range(count) for d in (0, 1000)}
    if len(ours) != 2 * count or fixtures & ours:
        raise ValueError("the training seeds overlap each other's or the fixtures' streams")


def fixture_rows(generator: ModuleType) -> dict[str, npt.NDArray[np.float32]]:
    """Each committed ECG fixture's signal as ingest's row: 500 Hz taken 2:1 to 250 Hz.

    From the generator with the fixtures' own seeds (tests/unit/test_onnx_models.py reads the
    committed JSON through ingest instead); ingest's linear resampling at exactly half the rate
    keeps every other sample.
    """
    return {
        name: np.asarray(generator.synthetic_ecg(rhythm, seed)[::2], dtype=np.float32)
        for name, (rhythm, _, seed) in generator.FIXTURES.items()
    }


# --- the network in numpy ------------------------------------------------------------------------


def init_params(
    rng: np.random.Generator,
    blocks: Blocks = BLOCKS,
    classes: int = len(CLASSES),
    dtype: type[np.floating[Any]] = np.float32,
) -> Params:
    """He-initialised weights: ``conv{i}_w`` [out, in, kernel] as ONNX Conv, ``dense_w`` [2C, K]."""
    params: Params = {}
    channels = 1
    for i, (out, kernel, _, _) in enumerate(blocks):
        scale = np.sqrt(2.0 / (channels * kernel))
        params[f"conv{i}_w"] = (scale * rng.standard_normal((out, channels, kernel))).astype(dtype)
        params[f"conv{i}_b"] = np.zeros(out, dtype=dtype)
        channels = out
    scale = np.sqrt(1.0 / (2 * channels))
    params["dense_w"] = (scale * rng.standard_normal((2 * channels, classes))).astype(dtype)
    params["dense_b"] = np.zeros(classes, dtype=dtype)
    return params


def standardise(x: Array) -> Array:
    """Per row: minus its mean, over ``sqrt(variance + EPS)`` (what the graph computes first)."""
    centered = x - x.mean(axis=1, keepdims=True)
    variance = (centered * centered).mean(axis=1, keepdims=True)
    return np.asarray(centered / np.sqrt(variance + x.dtype.type(EPS)))


class _ConvCache(NamedTuple):
    """What the backward pass of one block needs from its forward pass."""

    cols: Array  # [B * L_out, C_in * k]
    padded_len: int
    stride: int
    kernel: int
    pre_pool: Array  # ReLU output [B, L_out, C_out]
    argmax: npt.NDArray[np.intp]  # winner inside each pool window [B, L_pool, C_out]
    pool: int


def _conv_block(x: Array, w: Array, b: Array, stride: int, pool: int) -> tuple[Array, _ConvCache]:
    """Conv1d ("same" padding, ``stride``) + ReLU + MaxPool(pool), channels last: x [B, L, C]."""
    batch, _, channels = x.shape
    out, _, kernel = w.shape
    pad = kernel // 2
    padded = np.pad(x, ((0, 0), (pad, pad), (0, 0)))
    windows = np.lib.stride_tricks.sliding_window_view(padded, kernel, axis=1)[:, ::stride]
    length = windows.shape[1]  # windows [B, L_out, C, k]
    cols = np.ascontiguousarray(windows).reshape(batch * length, channels * kernel)
    y = (cols @ w.reshape(out, channels * kernel).T + b).reshape(batch, length, out)
    relu = np.maximum(y, 0)
    pooled_len = length // pool
    grouped = relu[:, : pooled_len * pool].reshape(batch, pooled_len, pool, out)
    argmax = grouped.argmax(axis=2)
    pooled = np.take_along_axis(grouped, argmax[:, :, np.newaxis, :], axis=2)[:, :, 0, :]
    return pooled, _ConvCache(cols, padded.shape[1], stride, kernel, relu, argmax, pool)


def _conv_block_backward(
    d_pooled: Array, w: Array, cache: _ConvCache
) -> tuple[Array, Array, Array]:
    """Gradients (d_input [B, L, C_in], d_w, d_b) of ``_conv_block`` given d_output."""
    batch, pooled_len, out = d_pooled.shape
    _, channels, kernel = w.shape
    relu = cache.pre_pool
    length = relu.shape[1]
    d_grouped = np.zeros((batch, pooled_len, cache.pool, out), dtype=d_pooled.dtype)
    np.put_along_axis(
        d_grouped, cache.argmax[:, :, np.newaxis, :], d_pooled[:, :, np.newaxis, :], axis=2
    )
    d_relu = np.zeros_like(relu)
    d_relu[:, : pooled_len * cache.pool] = d_grouped.reshape(batch, -1, out)
    d_y = (d_relu * (relu > 0)).reshape(batch * length, out)
    d_w = (d_y.T @ cache.cols).reshape(out, channels, kernel)
    d_b = d_y.sum(axis=0)
    d_cols = (d_y @ w.reshape(out, channels * kernel)).reshape(batch, length, channels, kernel)
    d_padded = np.zeros((batch, cache.padded_len, channels), dtype=d_pooled.dtype)
    stop = cache.stride * (length - 1) + 1
    for j in range(kernel):
        d_padded[:, j : j + stop : cache.stride] += d_cols[:, :, :, j]
    pad = kernel // 2
    return d_padded[:, pad : cache.padded_len - pad], d_w, d_b


def forward(
    params: Params, x: Array, blocks: Blocks = BLOCKS, keep: bool = False
) -> tuple[Array, list[Any]]:
    """Class probabilities [B, K] of rows ``x`` [B, L]; with ``keep``, what backward needs."""
    h = standardise(x)[:, :, np.newaxis]
    caches: list[Any] = []
    for i, (_, _, stride, pool) in enumerate(blocks):
        h, cache = _conv_block(h, params[f"conv{i}_w"], params[f"conv{i}_b"], stride, pool)
        if keep:
            caches.append(cache)
    argmax = h.argmax(axis=1)  # [B, C]
    features = np.concatenate([h.mean(axis=1), h.max(axis=1)], axis=1)
    logits = features @ params["dense_w"] + params["dense_b"]
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    probabilities = exp / exp.sum(axis=1, keepdims=True)
    if keep:
        caches.append((h.shape, argmax, features))
    return probabilities, caches


def loss_and_gradients(
    params: Params, x: Array, labels: npt.NDArray[np.int64], blocks: Blocks = BLOCKS
) -> tuple[float, Params]:
    """Mean cross-entropy of ``x`` against ``labels`` and its gradient for every parameter."""
    probabilities, caches = forward(params, x, blocks, keep=True)
    batch = x.shape[0]
    picked = probabilities[np.arange(batch), labels]
    loss = float(-np.mean(np.log(np.maximum(picked, 1e-12))))
    d_logits = probabilities.copy()
    d_logits[np.arange(batch), labels] -= 1
    d_logits /= batch
    h_shape, argmax, features = caches.pop()
    grads: Params = {
        "dense_w": features.T @ d_logits,
        "dense_b": d_logits.sum(axis=0),
    }
    d_features = d_logits @ params["dense_w"].T
    channels = h_shape[2]
    d_h = np.broadcast_to(d_features[:, np.newaxis, :channels] / h_shape[1], h_shape).copy()
    np.put_along_axis(
        d_h,
        argmax[:, np.newaxis, :],
        np.take_along_axis(d_h, argmax[:, np.newaxis, :], axis=1)
        + d_features[:, np.newaxis, channels:],
        axis=1,
    )
    for i in reversed(range(len(blocks))):
        d_h, grads[f"conv{i}_w"], grads[f"conv{i}_b"] = _conv_block_backward(
            d_h, params[f"conv{i}_w"], caches[i]
        )
    return loss, grads


def train(
    x: npt.NDArray[np.float32], labels: npt.NDArray[np.int64], seed: int = SEED
) -> tuple[Params, list[float]]:
    """Adam on mini-batches for ``EPOCHS`` epochs; returns the weights and each epoch's mean loss."""
    rng = np.random.default_rng(seed)
    params = init_params(rng)
    first = {k: np.zeros_like(v) for k, v in params.items()}
    second = {k: np.zeros_like(v) for k, v in params.items()}
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    step = 0
    history: list[float] = []
    for epoch in range(EPOCHS):
        rate = LEARNING_RATE * (0.5 if epoch >= EPOCHS * 2 // 3 else 1.0)
        order = rng.permutation(x.shape[0])
        losses = []
        for start in range(0, len(order), BATCH):
            batch = order[start : start + BATCH]
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
        print(f"  epoch {epoch + 1:>2}/{EPOCHS} loss {history[-1]:.4f}")
    return params, history


def predict(params: Params, x: Array, batch: int = 256) -> npt.NDArray[np.float32]:
    """Probabilities [N, K] in chunks of ``batch`` rows."""
    return np.concatenate(
        [forward(params, x[i : i + batch])[0] for i in range(0, x.shape[0], batch)]
    ).astype(np.float32)


# --- ONNX ----------------------------------------------------------------------------------------


def to_onnx(params: Params) -> onnx.ModelProto:
    """The network as an ONNX graph: ``ECG`` FP32 [batch, 2500] to ``PROBABILITIES`` [batch, 3]."""
    initializers = [
        numpy_helper.from_array(np.asarray(v, dtype=np.float32), name=k) for k, v in params.items()
    ] + [
        numpy_helper.from_array(np.asarray([EPS], dtype=np.float32), name="eps"),
        numpy_helper.from_array(np.asarray([1], dtype=np.int64), name="channel_axis"),
    ]
    nodes = [
        helper.make_node("ReduceMean", [INPUT], ["mean"], axes=[1], keepdims=1),
        helper.make_node("Sub", [INPUT, "mean"], ["centered"]),
        helper.make_node("Mul", ["centered", "centered"], ["squared"]),
        helper.make_node("ReduceMean", ["squared"], ["variance"], axes=[1], keepdims=1),
        helper.make_node("Add", ["variance", "eps"], ["variance_eps"]),
        helper.make_node("Sqrt", ["variance_eps"], ["scale"]),
        helper.make_node("Div", ["centered", "scale"], ["standardised"]),
        helper.make_node("Unsqueeze", ["standardised", "channel_axis"], ["h0"]),
    ]
    previous = "h0"
    for i, (_, kernel, stride, pool) in enumerate(BLOCKS):
        nodes += [
            helper.make_node(
                "Conv",
                [previous, f"conv{i}_w", f"conv{i}_b"],
                [f"conv{i}"],
                kernel_shape=[kernel],
                strides=[stride],
                pads=[kernel // 2, kernel // 2],
            ),
            helper.make_node("Relu", [f"conv{i}"], [f"relu{i}"]),
            helper.make_node(
                "MaxPool", [f"relu{i}"], [f"pool{i}"], kernel_shape=[pool], strides=[pool]
            ),
        ]
        previous = f"pool{i}"
    nodes += [
        helper.make_node("GlobalAveragePool", [previous], ["average"]),
        helper.make_node("GlobalMaxPool", [previous], ["maximum"]),
        helper.make_node("Concat", ["average", "maximum"], ["pooled"], axis=1),
        helper.make_node("Flatten", ["pooled"], ["features"], axis=1),
        helper.make_node("Gemm", ["features", "dense_w", "dense_b"], ["logits"]),
        helper.make_node("Softmax", ["logits"], [OUTPUT], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "ecg_rhythm_cnn",
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["batch", N_SAMPLES])],
        [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["batch", len(CLASSES)])],
        initializers,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="medmesh",
        doc_string=f"ecg-rhythm-cnn, trained by {SCRIPT} on synthetic data",
    )
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model


# --- the run -------------------------------------------------------------------------------------


def confusion(
    labels: npt.NDArray[np.int64], predicted: npt.NDArray[np.intp]
) -> npt.NDArray[np.int64]:
    """Counts [true class, predicted class]."""
    matrix = np.zeros((len(CLASSES), len(CLASSES)), dtype=np.int64)
    np.add.at(matrix, (labels, predicted), 1)
    return matrix


def check_onnx(model: onnx.ModelProto, x: Array, expected: Array) -> float:
    """Largest difference between onnxruntime's and the numpy forward pass's probabilities."""
    session = onnxruntime.InferenceSession(
        model.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    (onnx_p,) = session.run([OUTPUT], {INPUT: np.asarray(x, dtype=np.float32)})
    difference = float(np.max(np.abs(np.asarray(onnx_p) - expected)))
    if difference > ONNX_TOLERANCE:
        raise RuntimeError(f"onnxruntime and the numpy forward pass differ by {difference:.2e}")
    return difference


def check_fixtures(generator: ModuleType, fixture_p: dict[str, Array]) -> None:
    """Refuse a model that does not classify each committed fixture as its rhythm."""
    for name, p in fixture_p.items():
        want = RHYTHM_CLASS[generator.FIXTURES[name][0]]
        print(f"  {name:<18} {[round(float(v), 4) for v in p]}")
        if int(p.argmax()) != want:
            raise RuntimeError(f"{name} is not classified {CLASSES[want]}")


def held_out_metrics(
    test: tuple[npt.NDArray[np.int64], Array], noisy: tuple[npt.NDArray[np.int64], Array]
) -> tuple[dict[str, float], npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """(metrics, confusion matrix, noisy set's confusion matrix) from (labels, probabilities)."""
    labels, probabilities = test
    matrix = confusion(labels, probabilities.argmax(axis=1))
    noisy_matrix = confusion(noisy[0], noisy[1].argmax(axis=1))
    metrics = {"accuracy": float(np.trace(matrix) / matrix.sum())}
    for k, name in enumerate(CLASSES):
        metrics[f"accuracy_{name}"] = float(matrix[k, k] / matrix[k].sum())
    metrics["accuracy_noisy"] = float(np.trace(noisy_matrix) / noisy_matrix.sum())
    for k, name in enumerate(CLASSES[:2]):
        metrics[f"accuracy_noisy_{name}"] = float(noisy_matrix[k, k] / noisy_matrix[k].sum())
    picked = probabilities[np.arange(len(labels)), labels]
    metrics["log_loss"] = float(-np.mean(np.log(np.maximum(picked, 1e-12))))
    return metrics, matrix, noisy_matrix


def main() -> None:
    """Generate, train, check against onnxruntime and the fixtures, write the model and its card."""
    from threadpoolctl import threadpool_limits  # noqa: PLC0415 -- train group only

    started = time.perf_counter()
    generator = load_file(GENERATOR, "make_ecg_fixtures")
    train_x, train_y = dataset(generator, TRAIN_PER_CLASS, 0)
    test_x, test_y = dataset(generator, TEST_PER_CLASS, 3 * TRAIN_PER_CLASS)
    noisy_first = 3 * (TRAIN_PER_CLASS + TEST_PER_CLASS)
    noisy_x, noisy_y = dataset(generator, TEST_PER_CLASS, noisy_first, NOISY_MV)
    check_seeds(generator, noisy_first + 3 * TEST_PER_CLASS)
    print(f"generated {train_x.shape[0]} training and {test_x.shape[0]} held-out ECGs")
    with threadpool_limits(limits=1):
        params, history = train(train_x, train_y)
        test_p = predict(params, test_x)
        noisy_p = predict(params, noisy_x)
        rows = fixture_rows(generator)
        fixture_p = dict(zip(rows, predict(params, np.stack(list(rows.values()))), strict=True))
    seconds = time.perf_counter() - started

    model = to_onnx(params)
    difference = check_onnx(model, test_x, test_p)
    check_fixtures(generator, fixture_p)
    ONNX_PATH.parent.mkdir(parents=True, exist_ok=True)
    ONNX_PATH.write_bytes(model.SerializeToString())
    found, matrix, noisy_matrix = held_out_metrics((test_y, test_p), (noisy_y, noisy_p))
    found |= {"final_train_loss": history[-1], "onnx_max_abs_diff": difference}
    metrics: dict[str, Any] = {k: round(v, 4) for k, v in found.items()}
    metrics |= {
        "train_rows": int(train_x.shape[0]),
        "test_rows": int(test_x.shape[0]),
        "noisy_test_rows": int(noisy_x.shape[0]),
        "training_script": SCRIPT,
        "sha256": hashlib.sha256(ONNX_PATH.read_bytes()).hexdigest(),
    }
    METRICS_PATH.write_text(json.dumps(metrics, indent=2) + "\n")
    CARD_PATH.write_text(model_card(metrics, matrix, noisy_matrix, fixture_p))
    print(f"wrote {ONNX_PATH.relative_to(ROOT)} ({ONNX_PATH.stat().st_size} bytes)")
    print(f"  sha256 {metrics['sha256']}")
    for title, counts, accuracy in (
        ("held-out", matrix, metrics["accuracy"]),
        ("noisier held-out", noisy_matrix, metrics["accuracy_noisy"]),
    ):
        print(f"  {title} accuracy {accuracy}, confusion (rows true, columns predicted):")
        for name, row in zip(CLASSES, counts, strict=True):
            print(f"    {name:<10} {row.tolist()}")
    print(f"generated and trained in {seconds:.0f} s")


def model_card(
    metrics: dict[str, Any],
    matrix: npt.NDArray[np.int64],
    noisy_matrix: npt.NDArray[np.int64],
    fixture_p: dict[str, Array],
) -> str:
    """MODEL_CARD.md: what the model is for, what it was trained on, how well, and its limits."""
    header = "| true \\ predicted | " + " | ".join(CLASSES) + " |\n|---|---|---|---|\n"

    def table(counts: npt.NDArray[np.int64]) -> str:
        return header + "\n".join(
            f"| {name} | " + " | ".join(str(int(v)) for v in row) + " |"
            for name, row in zip(CLASSES, counts, strict=True)
        )

    fixtures = "\n".join(
        f"| `{name}` | " + " | ".join(f"{v:.4f}" for v in p) + " |" for name, p in fixture_p.items()
    )
    blocks = "\n".join(
        f"- Conv1d to {out} channels, kernel {kernel}, stride {stride}, padding {kernel // 2}; "
        f"ReLU; MaxPool {pool}"
        for out, kernel, stride, pool in BLOCKS
    )
    weights = sum(int(np.prod(v.shape)) for v in init_params(np.random.default_rng(0)).values())
    return f"""# Model card: ecg-rhythm-cnn (version 1)

Written by `{SCRIPT}`; do not edit by hand (re-run the script).

## Intended use

A demonstration of a neural network with trained weights served by Triton's `onnxruntime_onnx`
platform through the same plugin contract as `ecg-rhythm` (model spec deploy/models/ecg-rhythm.yaml):
one ECG lead, 10 s, classified as regular rhythm, irregular rhythm (possible atrial
fibrillation) or unreadable. For testing the medmesh pipeline only; **not** for clinical
decisions and not a diagnostic device.

## Interface

- Input `{INPUT}` FP32 `[batch, {N_SAMPLES}]`: one lead in mV at {RATE_HZ:g} Hz, 10 s, the row ingest
  sends (FHIR SampledData converted to mV, resampled, last 10 s kept).
- Output `{OUTPUT}` FP32 `[batch, {len(CLASSES)}]`: probabilities of
  {", ".join(f"{k} {name}" for k, name in enumerate(CLASSES))}; each row sums to 1.
- ONNX opset {OPSET}, IR version {IR_VERSION}; standard operators only.

## Model

- Per-row standardisation in the graph: `(x - mean) / sqrt(var + {EPS:g} mV^2)`
{blocks}
- Global average and global max pooling over time, concatenated; a dense layer; softmax.

{weights} weights, trained in numpy (im2col convolutions, a hand-written backward pass checked
against numerical gradients in tests/unit/test_onnx_models.py), Adam (learning rate
{LEARNING_RATE:g}, halved for the last third of the epochs), mini-batches of {BATCH},
{EPOCHS} epochs, seed {SEED}, one BLAS thread; final training loss {metrics["final_train_loss"]}.

## Training data

Synthetic only, {metrics["train_rows"]} training and {metrics["test_rows"]} held-out ECGs, one
third per class. Every ECG has its own generator seed (`generator_seed`: from {SEED_BASE}, in
blocks of 1000 seeds 1000 apart, since the generator also draws from seed + 1000); the training,
held-out and noisy held-out ECGs take consecutive ranges of them, and none meets the committed
fixtures' seeds (11-14):

- regular: `synthetic_ecg("sinus", seed, ...)` of tests/fixtures/fhir/make_ecg_fixtures.py (sinus
  rhythm with P waves, RR varying about 2 % plus respiratory modulation);
- irregular: `synthetic_ecg("af", seed, ...)` (no P waves, fibrillatory waves 4-8 Hz, each RR drawn
  independently with a coefficient of variation near 0.25);
- both with a tempo factor in [{TEMPO[0]}, {TEMPO[1]}] (sinus about {72 * TEMPO[0]:.0f}-{72 * TEMPO[1]:.0f} /min, AF about
  {100 * TEMPO[0]:.0f}-{100 * TEMPO[1]:.0f} /min), white noise {NOISE_MV[0]}-{NOISE_MV[1]} mV and a gain of {GAIN[0]}-{GAIN[1]};
- unreadable (made by the training script): a flat line (constant, 0 to 0.01 mV noise, 2.5 uV
  quantisation), heavy white or smoothed noise (0.15-1 mV, sometimes with baseline wander), or
  baseline wander alone (1-3 sinusoids of 0.05-0.8 Hz, 0.1-1 mV).

## Held-out metrics ({metrics["test_rows"]} synthetic ECGs)

| metric | value |
|---|---|
| accuracy | {metrics["accuracy"]} |
| accuracy, regular | {metrics["accuracy_regular"]} |
| accuracy, irregular | {metrics["accuracy_irregular"]} |
| accuracy, unreadable | {metrics["accuracy_unreadable"]} |
| log loss | {metrics["log_loss"]} |
| largest difference onnxruntime vs numpy (required below {ONNX_TOLERANCE:g}) | {metrics["onnx_max_abs_diff"]} |

Chance is 1/3. Confusion matrix (rows true class, columns predicted):

{table(matrix)}

A second held-out set of {metrics["noisy_test_rows"]} ECGs (new seeds) whose sinus and AF ECGs are
noisier than any training ECG (white noise {NOISY_MV[0]}-{NOISY_MV[1]} mV): accuracy
{metrics["accuracy_noisy"]} (regular {metrics["accuracy_noisy_regular"]}, irregular
{metrics["accuracy_noisy_irregular"]}).

{table(noisy_matrix)}

The committed fixtures (from their generator seeds, 500 Hz taken 2:1 to 250 Hz):

| fixture | {" | ".join(CLASSES)} |
|---|---|---|---|
{fixtures}

## Limitations

- A held-out accuracy near 1 says that the generator's three classes are easy to tell apart,
  not that the network reads ECGs well: the held-out ECGs come from the same generator.
- Trained and evaluated on one simple synthetic ECG generator only (Gaussian P-QRS-T waves), never
  on real ECGs: not clinically validated. Real recordings (other leads, ectopic beats, flutter,
  paced rhythms, bundle branch blocks, motion artefacts, other sampling rates) are out of
  distribution; the network may rely on cues peculiar to the generator (for example the
  presence of its P wave) rather than on RR irregularity.
- "Irregular" means the generator's AF; other irregular rhythms were never seen.
- The probabilities are not calibrated beyond the held-out log loss.

## Reproduce

`.tools/uv/bin/uv sync --group train`, then `.venv/bin/python {SCRIPT}`: byte-identical output
(sha256 `{metrics["sha256"]}`).
"""


if __name__ == "__main__":
    main()
