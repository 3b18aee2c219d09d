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

import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script: only deploy/training is on the path
    sys.path.insert(0, str(ROOT))

# Imported after the path is set (E402), which the script run needs.
from deploy.training import numpy_nn  # noqa: E402
from deploy.training.numpy_nn import OUTPUT, Array, Labels, Params  # noqa: E402

FILES = numpy_nn.model_files("ecg-rhythm-cnn", "deploy/training/train_ecg_cnn.py")

INPUT = "ECG"
CLASSES = ("regular", "irregular", "unreadable")
RHYTHM_CLASS = {"sinus": 0, "af": 1}  # the generator's rhythms
RATE_HZ = 250.0
DURATION_S = 10.0
N_SAMPLES = 2500
EPS = 1e-3  # mV^2: a flat line stays near 0 after standardisation instead of blowing up noise

# (out channels, kernel, stride, max-pool size) of each convolution block.
Blocks = tuple[tuple[int, int, int, int], ...]
BLOCKS: Blocks = ((8, 7, 2, 2), (16, 7, 1, 4), (32, 7, 1, 2))

SEED_BASE = 1_000_000  # generator seeds; the fixtures use 11-14 (and 1011-1014 internally)
TRAIN_PER_CLASS = 900
TEST_PER_CLASS = 200
SCHEDULE = numpy_nn.Schedule(epochs=14, batch=32, learning_rate=2e-3, seed=20260101)
TEMPO = (0.8, 1.25)
NOISE_MV = (0.005, 0.06)
GAIN = (0.6, 1.6)
# A second held-out set, noisier than any training ECG: how the accuracy degrades off-distribution.
NOISY_MV = (0.08, 0.15)


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
    rng: np.random.Generator, blocks: Blocks = BLOCKS, dtype: numpy_nn.Float = np.float32
) -> Params:
    """He-initialised weights: ``conv{i}_w`` [out, in, kernel] as ONNX Conv, ``dense_w`` [2C, K]."""
    ins = (1, *(out for out, _, _, _ in blocks[:-1]))
    convs = [(out, c, kernel) for c, (out, kernel, _, _) in zip(ins, blocks, strict=True)]
    return numpy_nn.init_params(rng, convs, len(CLASSES), dtype)


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
    probabilities, head = numpy_nn.head_forward(params, h)  # h [B, L, C]: cells are time steps
    if keep:
        caches.append(head)
    return probabilities, caches


def loss_and_gradients(
    params: Params, x: Array, labels: Labels, blocks: Blocks = BLOCKS
) -> tuple[float, Params]:
    """Mean cross-entropy of ``x`` against ``labels`` and its gradient for every parameter."""
    probabilities, caches = forward(params, x, blocks, keep=True)
    loss, grads, d_h = numpy_nn.head_backward(params, probabilities, labels, caches.pop())
    for i in reversed(range(len(blocks))):
        d_h, grads[f"conv{i}_w"], grads[f"conv{i}_b"] = _conv_block_backward(
            d_h, params[f"conv{i}_w"], caches[i]
        )
    return loss, grads


# --- ONNX ----------------------------------------------------------------------------------------


def to_onnx(params: Params) -> onnx.ModelProto:
    """The network as an ONNX graph: ``ECG`` FP32 [batch, 2500] to ``PROBABILITIES`` [batch, 3]."""
    weights = [
        *numpy_nn.initializers(params),
        numpy_helper.from_array(np.asarray([EPS], dtype=np.float32), name="eps"),
        numpy_helper.from_array(np.asarray([1], dtype=np.int64), name="channel_axis"),
    ]
    nodes = [
        *numpy_nn.standardise_nodes(INPUT, [1]),
        helper.make_node("Unsqueeze", ["standardised", "channel_axis"], ["h0"]),
    ]
    previous = "h0"
    for i, (_, kernel, stride, pool) in enumerate(BLOCKS):
        nodes += numpy_nn.conv_block_nodes(
            i,
            previous,
            [pool],
            kernel_shape=[kernel],
            strides=[stride],
            pads=[kernel // 2, kernel // 2],
        )
        previous = f"pool{i}"
    return numpy_nn.onnx_model(
        nodes + numpy_nn.head_nodes(previous),
        "ecg_rhythm_cnn",
        helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["batch", N_SAMPLES]),
        len(CLASSES),
        weights,
        f"ecg-rhythm-cnn, trained by {FILES.script} on synthetic data",
    )


# --- the run -------------------------------------------------------------------------------------


def held_out_metrics(
    test: tuple[Labels, Array], noisy: tuple[Labels, Array]
) -> tuple[dict[str, float], Labels, Labels]:
    """(metrics, confusion matrix, noisy set's confusion matrix) from (labels, probabilities)."""
    labels, probabilities = test
    matrix = numpy_nn.confusion(labels, probabilities.argmax(axis=1), len(CLASSES))
    noisy_matrix = numpy_nn.confusion(noisy[0], noisy[1].argmax(axis=1), len(CLASSES))
    metrics = {"accuracy": float(np.trace(matrix) / matrix.sum())}
    for k, name in enumerate(CLASSES):
        metrics[f"accuracy_{name}"] = float(matrix[k, k] / matrix[k].sum())
    metrics["accuracy_noisy"] = float(np.trace(noisy_matrix) / noisy_matrix.sum())
    for k, name in enumerate(CLASSES[:2]):
        metrics[f"accuracy_noisy_{name}"] = float(noisy_matrix[k, k] / noisy_matrix[k].sum())
    metrics["log_loss"] = numpy_nn.log_loss(probabilities, labels)
    return metrics, matrix, noisy_matrix


def main() -> None:
    """Generate, train, check against onnxruntime and the fixtures, write the model and its card."""
    from threadpoolctl import threadpool_limits  # noqa: PLC0415 -- train group only

    # Imported here, not at the top (PLC0415): only a run needs the fixture generator.
    from tests.fixtures.fhir import make_ecg_fixtures as generator  # noqa: PLC0415

    started = time.perf_counter()
    train_x, train_y = dataset(generator, TRAIN_PER_CLASS, 0)
    test_x, test_y = dataset(generator, TEST_PER_CLASS, 3 * TRAIN_PER_CLASS)
    noisy_first = 3 * (TRAIN_PER_CLASS + TEST_PER_CLASS)
    noisy_x, noisy_y = dataset(generator, TEST_PER_CLASS, noisy_first, NOISY_MV)
    check_seeds(generator, noisy_first + 3 * TEST_PER_CLASS)
    print(f"generated {train_x.shape[0]} training and {test_x.shape[0]} held-out ECGs")
    with threadpool_limits(limits=1):
        params, history = numpy_nn.train(
            train_x, train_y, init_params, loss_and_gradients, SCHEDULE
        )
        test_p = numpy_nn.predict(forward, params, test_x)
        noisy_p = numpy_nn.predict(forward, params, noisy_x)
        rows = fixture_rows(generator)
        fixture_x = np.stack(list(rows.values()))
        fixture_p = dict(zip(rows, numpy_nn.predict(forward, params, fixture_x), strict=True))
    seconds = time.perf_counter() - started

    model = to_onnx(params)
    difference = numpy_nn.check_onnx(model, INPUT, test_x, test_p)
    wanted = {name: RHYTHM_CLASS[generator.FIXTURES[name][0]] for name in fixture_p}
    numpy_nn.check_fixtures(fixture_p, wanted, CLASSES)
    found, matrix, noisy_matrix = held_out_metrics((test_y, test_p), (noisy_y, noisy_p))
    found |= {"final_train_loss": history[-1], "onnx_max_abs_diff": difference}
    metrics: dict[str, Any] = {k: round(v, 4) for k, v in found.items()}
    metrics |= {
        "train_rows": int(train_x.shape[0]),
        "test_rows": int(test_x.shape[0]),
        "noisy_test_rows": int(noisy_x.shape[0]),
    }
    metrics = numpy_nn.write_model(
        FILES, model, metrics, lambda m: model_card(m, matrix, noisy_matrix, fixture_p)
    )
    for title, counts, accuracy in (
        ("held-out", matrix, metrics["accuracy"]),
        ("noisier held-out", noisy_matrix, metrics["accuracy_noisy"]),
    ):
        print(f"  {title} accuracy {accuracy}, confusion (rows true, columns predicted):")
        numpy_nn.print_confusion(CLASSES, counts)
    print(f"generated and trained in {seconds:.0f} s")


def model_card(
    metrics: dict[str, Any],
    matrix: Labels,
    noisy_matrix: Labels,
    fixture_p: dict[str, Array],
) -> str:
    """MODEL_CARD.md: what the model is for, what it was trained on, how well, and its limits."""
    blocks = "\n".join(
        f"- Conv1d to {out} channels, kernel {kernel}, stride {stride}, padding {kernel // 2}; "
        f"ReLU; MaxPool {pool}"
        for out, kernel, stride, pool in BLOCKS
    )
    weights = numpy_nn.weight_count(init_params(np.random.default_rng(0)))
    script, epochs, batch, rate, seed = FILES.script, *SCHEDULE
    return f"""# Model card: ecg-rhythm-cnn (version 1)

Written by `{script}`; do not edit by hand (re-run the script).

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
- ONNX opset {numpy_nn.OPSET}, IR version {numpy_nn.IR_VERSION}; standard operators only.

## Model

- Per-row standardisation in the graph: `(x - mean) / sqrt(var + {EPS:g} mV^2)`
{blocks}
- Global average and global max pooling over time, concatenated; a dense layer; softmax.

{weights} weights, trained in numpy (im2col convolutions, a hand-written backward pass checked
against numerical gradients in tests/unit/test_onnx_models.py), Adam (learning rate
{rate:g}, halved for the last third of the epochs), mini-batches of {batch},
{epochs} epochs, seed {seed}, one BLAS thread; final training loss {metrics["final_train_loss"]}.

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
| largest difference onnxruntime vs numpy (required below {numpy_nn.ONNX_TOLERANCE:g}) | {metrics["onnx_max_abs_diff"]} |

Chance is 1/3. Confusion matrix (rows true class, columns predicted):

{numpy_nn.confusion_table(CLASSES, matrix)}

A second held-out set of {metrics["noisy_test_rows"]} ECGs (new seeds) whose sinus and AF ECGs are
noisier than any training ECG (white noise {NOISY_MV[0]}-{NOISY_MV[1]} mV): accuracy
{metrics["accuracy_noisy"]} (regular {metrics["accuracy_noisy_regular"]}, irregular
{metrics["accuracy_noisy_irregular"]}).

{numpy_nn.confusion_table(CLASSES, noisy_matrix)}

The committed fixtures (from their generator seeds, 500 Hz taken 2:1 to 250 Hz):

| fixture | {" | ".join(CLASSES)} |
|---|---|---|---|
{numpy_nn.probability_rows(fixture_p, "`{}`")}

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

{numpy_nn.reproduce_section(metrics)}"""


if __name__ == "__main__":
    main()
