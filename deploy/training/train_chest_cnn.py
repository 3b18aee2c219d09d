"""Train chest-opacity-cnn: a small 2-D convolutional network in numpy, exported as ONNX.

A demonstration trained on synthetic images only. Run from the repository root, with the
``train`` dependency group installed: ``.venv/bin/python deploy/training/train_chest_cnn.py``.
It writes, under deploy/triton/models/chest-opacity-cnn/: ``1/model.onnx``, ``metrics.json`` and
``MODEL_CARD.md`` (``config.pbtxt`` beside them is written by hand). numpy only (no deep-learning
framework): im2col convolutions, a hand-written backward pass and Adam; fixed seeds and one BLAS
thread, so re-running gives byte-identical files.

Data: ``synthetic_radiograph(seed, opacity)`` of cli/src/medmesh_cli/devstack/radiographs.py,
256 x 256 12-bit MONOCHROME2 images, half of them with a soft bright opacity in a lung field.
Classes, in the order of the output columns: 0 ``no-opacity``, 1 ``opacity``. Every image has
its own seed (``generator_seed``), far from the fixtures' (101-202), which are held out and must
be classified correctly.

Preprocessing (``preprocess``, outside the graph, as medmesh's imaging preprocessing does it):
the 256 x 256 stored values are averaged over 4 x 4 blocks (area resize to 64 x 64) and divided
by 4095 (the 12-bit range) to [0, 1], brighter is higher (MONOCHROME2); FP32 ``[1, 64, 64]``.

The network (``forward``), on an image ``x`` [64, 64]:

``z = (x - mean(x)) / sqrt(var(x) + EPS)`` over the image (in the graph, in float64), then three
blocks of Conv2d (3 x 3, padding 1) + ReLU + MaxPool 2 x 2, global average and global max pooling
(concatenated, as the ECG CNN: an opacity is local, and the maximum finds it wherever it lies), a
dense layer and softmax. The loss is the mean cross-entropy.
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

FILES = numpy_nn.model_files("chest-opacity-cnn", "deploy/training/train_chest_cnn.py")

INPUT = "IMAGE"
CLASSES = ("no-opacity", "opacity")
SOURCE_SIZE = 256  # the generator's images
SIZE = 64  # the model's input, SOURCE_SIZE / 4 by area averaging
MAX_VALUE = 4095.0  # 12 bits stored
EPS = 1e-4  # an almost uniform image stays near 0 after standardisation instead of blowing up

# Output channels of each block: Conv2d 3 x 3 (padding 1) + ReLU + MaxPool 2 x 2.
Blocks = tuple[int, ...]
BLOCKS: Blocks = (8, 16, 16)
KERNEL = 3

SEED_BASE = 2_000_000  # generator seeds; the fixtures use 101-202
TRAIN_PER_CLASS = 1000
TEST_PER_CLASS = 500
SCHEDULE = numpy_nn.Schedule(epochs=12, batch=32, learning_rate=3e-3, seed=20260102)
# Opacities smaller than this radius (source pixels) are reported apart: the hard cases.
SMALL_RADIUS = 0.05 * SOURCE_SIZE


# --- data ----------------------------------------------------------------------------------------


def preprocess(image: npt.NDArray[np.uint16]) -> npt.NDArray[np.float32]:
    """The model input [1, 64, 64] of a 256 x 256 12-bit MONOCHROME2 image.

    Area resize (the mean of each 4 x 4 block), then the stored values over 4095, in float64
    before the cast to FP32.
    """
    if image.shape != (SOURCE_SIZE, SOURCE_SIZE):
        raise ValueError(f"expected a {SOURCE_SIZE} x {SOURCE_SIZE} image, got {image.shape}")
    factor = SOURCE_SIZE // SIZE
    blocks = image.astype(np.float64).reshape(SIZE, factor, SIZE, factor)
    return np.asarray(blocks.mean(axis=(1, 3)) / MAX_VALUE, dtype=np.float32)[np.newaxis]


def generator_seed(index: int) -> int:
    """The seed of the ``index``-th synthetic image."""
    return SEED_BASE + index


def dataset(
    generator: ModuleType, per_class: int, first_index: int
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64], npt.NDArray[np.float64]]:
    """(images [2 per_class, 1, 64, 64], labels, opacity radius or 0) of images ``first_index``..

    Even indexes have no opacity, odd ones have one.
    """
    images: list[npt.NDArray[np.float32]] = []
    labels: list[int] = []
    radii: list[float] = []
    for i in range(first_index, first_index + 2 * per_class):
        seed, opacity = generator_seed(i), i % 2 == 1
        images.append(preprocess(generator.synthetic_radiograph(seed, opacity, SOURCE_SIZE)))
        labels.append(int(opacity))
        radii.append(generator.opacity_geometry(seed, SOURCE_SIZE).radius if opacity else 0.0)
    return np.stack(images), np.asarray(labels, dtype=np.int64), np.asarray(radii)


def check_seeds(generator: ModuleType, count: int) -> None:
    """Refuse to train if the first ``count`` images' seeds meet the fixtures' ones."""
    fixtures = set(generator.OPACITY_FIXTURE_SEEDS) | set(generator.CLEAR_FIXTURE_SEEDS)
    if fixtures & {generator_seed(i) for i in range(count)}:
        raise ValueError("the training seeds overlap the fixtures' seeds")


def fixture_images(generator: ModuleType) -> dict[str, tuple[int, npt.NDArray[np.float32]]]:
    """Each held-out fixture image, preprocessed, with its class: name -> (class, [1, 64, 64])."""
    fixtures: dict[str, tuple[int, npt.NDArray[np.float32]]] = {}
    for label, seeds in ((1, generator.OPACITY_FIXTURE_SEEDS), (0, generator.CLEAR_FIXTURE_SEEDS)):
        for seed in seeds:
            image = generator.synthetic_radiograph(seed, bool(label), SOURCE_SIZE)
            fixtures[f"{CLASSES[label]} seed {seed}"] = (label, preprocess(image))
    return fixtures


# --- the network in numpy ------------------------------------------------------------------------


def init_params(
    rng: np.random.Generator, blocks: Blocks = BLOCKS, dtype: numpy_nn.Float = np.float32
) -> Params:
    """He-initialised weights: ``conv{i}_w`` [out, in, 3, 3] as ONNX Conv, ``dense_w`` [2C, K]."""
    ins = (1, *blocks[:-1])
    convs = [(out, c, KERNEL, KERNEL) for c, out in zip(ins, blocks, strict=True)]
    return numpy_nn.init_params(rng, convs, len(CLASSES), dtype)


def standardise(x: Array) -> Array:
    """Per image [B, H, W]: minus its mean, over ``sqrt(variance + EPS)`` (the graph's first step).

    In float64, as the graph does it: float32 sums over 4096 pixels differ between numpy and
    onnxruntime by a few 1e-6 relative, which a confident network turns into more than
    ``numpy_nn.ONNX_TOLERANCE`` on the probabilities.
    """
    wide = x.astype(np.float64)
    centered = wide - wide.mean(axis=(1, 2), keepdims=True)
    variance = (centered * centered).mean(axis=(1, 2), keepdims=True)
    return np.asarray(centered / np.sqrt(variance + EPS), dtype=x.dtype)


class _ConvCache(NamedTuple):
    """What the backward pass of one block needs from its forward pass."""

    cols: Array  # [B * H * W, C_in * 9]
    pre_pool: Array  # ReLU output [B, H, W, C_out]
    pooled: Array  # [B, H/2, W/2, C_out]


# The four positions of a 2 x 2 pooling window, row-major: (row offset, column offset).
_WINDOW = ((0, 0), (0, 1), (1, 0), (1, 1))


def _conv_block(x: Array, w: Array, b: Array) -> tuple[Array, _ConvCache]:
    """Conv2d 3 x 3 (padding 1) + ReLU + MaxPool 2 x 2, channels last: x [B, H, W, C]."""
    batch, height, width, _ = x.shape
    out = w.shape[0]
    pad = KERNEL // 2
    padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    windows = np.lib.stride_tricks.sliding_window_view(padded, (1, KERNEL, KERNEL, 1))
    windows = windows[:, :, :, :, 0, :, :, 0]
    # windows [B, H, W, C, 3, 3]: rows of (channel, kernel row, kernel column), as w's layout.
    cols = np.ascontiguousarray(windows).reshape(batch * height * width, -1)
    y = (cols @ w.reshape(out, -1).T + b).reshape(batch, height, width, out)
    relu = np.maximum(y, 0)
    quarters = [relu[:, r::2, c::2] for r, c in _WINDOW]
    pooled = np.maximum(np.maximum(quarters[0], quarters[1]), np.maximum(quarters[2], quarters[3]))
    return pooled, _ConvCache(cols, relu, pooled)


def _conv_block_backward(
    d_pooled: Array, w: Array, cache: _ConvCache, input_gradient: bool = True
) -> tuple[Array | None, Array, Array]:
    """Gradients (d_input [B, H, W, C_in], d_w, d_b) of ``_conv_block`` given d_output.

    Without ``input_gradient``, d_input is None: the first block's input is the image, and its
    gradient, the costliest part at full resolution, is not needed.
    """
    batch, half_h, half_w, out = d_pooled.shape
    channels = w.shape[1]
    height, width = 2 * half_h, 2 * half_w
    # Each window's gradient goes to its first maximum (row-major), as an argmax would send it;
    # a window of zeros (ReLU off everywhere) passes nothing either way.
    d_y = np.zeros_like(cache.pre_pool)
    taken = cache.pooled <= 0
    for r, c in _WINDOW:
        winner = (cache.pre_pool[:, r::2, c::2] == cache.pooled) & ~taken
        d_y[:, r::2, c::2] = winner * d_pooled
        taken |= winner
    d_y = d_y.reshape(batch * height * width, out)
    d_w = (d_y.T @ cache.cols).reshape(w.shape)
    d_b = d_y.sum(axis=0)
    if not input_gradient:
        return None, d_w, d_b
    d_cols = (d_y @ w.reshape(out, -1)).reshape(batch, height, width, channels, KERNEL, KERNEL)
    pad = KERNEL // 2
    d_padded = np.zeros((batch, height + 2 * pad, width + 2 * pad, channels), dtype=d_pooled.dtype)
    for i in range(KERNEL):
        for j in range(KERNEL):
            d_padded[:, i : i + height, j : j + width] += d_cols[..., i, j]
    return d_padded[:, pad : pad + height, pad : pad + width], d_w, d_b


def forward(
    params: Params, x: Array, blocks: Blocks = BLOCKS, keep: bool = False
) -> tuple[Array, list[Any]]:
    """Class probabilities [B, K] of images ``x`` [B, 1, H, W]; with ``keep``, what backward needs."""
    h = standardise(x[:, 0])[..., np.newaxis]
    caches: list[Any] = []
    for i in range(len(blocks)):
        h, cache = _conv_block(h, params[f"conv{i}_w"], params[f"conv{i}_b"])
        if keep:
            caches.append(cache)
    flat = h.reshape(h.shape[0], -1, h.shape[3])  # [B, cells, C]
    probabilities, head = numpy_nn.head_forward(params, flat)
    if keep:
        caches.append((h.shape, head))
    return probabilities, caches


def loss_and_gradients(
    params: Params, x: Array, labels: Labels, blocks: Blocks = BLOCKS
) -> tuple[float, Params]:
    """Mean cross-entropy of ``x`` against ``labels`` and its gradient for every parameter."""
    probabilities, caches = forward(params, x, blocks, keep=True)
    h_shape, head = caches.pop()
    loss, grads, d_flat = numpy_nn.head_backward(params, probabilities, labels, head)
    d_h = d_flat.reshape(h_shape)
    for i in reversed(range(len(blocks))):
        d_input, grads[f"conv{i}_w"], grads[f"conv{i}_b"] = _conv_block_backward(
            d_h, params[f"conv{i}_w"], caches[i], input_gradient=i > 0
        )
        if d_input is not None:
            d_h = d_input
    return loss, grads


# --- ONNX ----------------------------------------------------------------------------------------


def to_onnx(params: Params) -> onnx.ModelProto:
    """The network as an ONNX graph: ``IMAGE`` FP32 [batch, 1, 64, 64] to ``PROBABILITIES`` [batch, 2]."""
    weights = [
        *numpy_nn.initializers(params),
        numpy_helper.from_array(np.asarray([EPS], dtype=np.float64), name="eps"),
    ]
    nodes = [  # the standardisation in float64 (``standardise`` says why)
        helper.make_node("Cast", [INPUT], ["image64"], to=TensorProto.DOUBLE),
        *numpy_nn.standardise_nodes("image64", [1, 2, 3]),
        helper.make_node("Cast", ["standardised"], ["h0"], to=TensorProto.FLOAT),
    ]
    previous = "h0"
    pad = KERNEL // 2
    for i in range(len(BLOCKS)):
        nodes += numpy_nn.conv_block_nodes(
            i, previous, [2, 2], kernel_shape=[KERNEL, KERNEL], pads=[pad, pad, pad, pad]
        )
        previous = f"pool{i}"
    return numpy_nn.onnx_model(
        nodes + numpy_nn.head_nodes(previous),
        "chest_opacity_cnn",
        helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["batch", 1, SIZE, SIZE]),
        len(CLASSES),
        weights,
        f"chest-opacity-cnn, a demonstration trained by {FILES.script} on synthetic images",
    )


# --- the run -------------------------------------------------------------------------------------


def roc_auc(labels: Labels, scores: Array) -> float:
    """Area under the ROC curve: P(score of a positive > score of a negative), ties count half."""
    positives, negatives = scores[labels == 1], scores[labels == 0]
    greater = (positives[:, np.newaxis] > negatives[np.newaxis, :]).sum()
    ties = (positives[:, np.newaxis] == negatives[np.newaxis, :]).sum()
    return float((greater + 0.5 * ties) / (positives.size * negatives.size))


def held_out_metrics(
    labels: Labels, probabilities: Array, radii: npt.NDArray[np.float64]
) -> tuple[dict[str, float], Labels]:
    """(metrics, confusion matrix) of the held-out images."""
    predicted = probabilities.argmax(axis=1)
    matrix = numpy_nn.confusion(labels, predicted, len(CLASSES))
    small = (labels == 1) & (radii < SMALL_RADIUS)
    metrics = {
        "accuracy": float(np.trace(matrix) / matrix.sum()),
        "sensitivity": float(matrix[1, 1] / matrix[1].sum()),
        "specificity": float(matrix[0, 0] / matrix[0].sum()),
        "sensitivity_small_opacity": float(np.mean(predicted[small] == 1)),
        "small_opacity_rows": float(small.sum()),
        "auc": roc_auc(labels, probabilities[:, 1]),
        "log_loss": numpy_nn.log_loss(probabilities, labels),
    }
    return metrics, matrix


def main() -> None:
    """Generate, train, check against onnxruntime and the fixtures, write the model and its card."""
    from threadpoolctl import threadpool_limits  # noqa: PLC0415 -- train group only

    # Imported here, not at the top (PLC0415): only a run needs the fixture generator.
    from medmesh_cli.devstack import radiographs as generator  # noqa: PLC0415

    started = time.perf_counter()
    check_seeds(generator, 2 * (TRAIN_PER_CLASS + TEST_PER_CLASS))
    with threadpool_limits(limits=1):
        train_x, train_y, _ = dataset(generator, TRAIN_PER_CLASS, 0)
        test_x, test_y, test_radii = dataset(generator, TEST_PER_CLASS, 2 * TRAIN_PER_CLASS)
        generated = time.perf_counter() - started
        print(f"generated {train_x.shape[0]} training and {test_x.shape[0]} held-out images")
        params, history = numpy_nn.train(
            train_x, train_y, init_params, loss_and_gradients, SCHEDULE
        )
        test_p = numpy_nn.predict(forward, params, test_x)
        fixtures = fixture_images(generator)
        fixture_x = np.stack([image for _, image in fixtures.values()])
        fixture_p = dict(zip(fixtures, numpy_nn.predict(forward, params, fixture_x), strict=True))
    seconds = time.perf_counter() - started

    model = to_onnx(params)
    difference = numpy_nn.check_onnx(model, INPUT, test_x, test_p)
    numpy_nn.check_fixtures(fixture_p, {name: fixtures[name][0] for name in fixture_p}, CLASSES)
    found, matrix = held_out_metrics(test_y, test_p, test_radii)
    found |= {"final_train_loss": history[-1], "onnx_max_abs_diff": difference}
    metrics: dict[str, Any] = {k: round(v, 4) for k, v in found.items()}
    metrics["small_opacity_rows"] = int(found["small_opacity_rows"])
    metrics["onnx_max_abs_diff"] = float(f"{difference:.1e}")  # 4 decimals would show 0.0
    metrics |= {"train_rows": int(train_x.shape[0]), "test_rows": int(test_x.shape[0])}
    metrics = numpy_nn.write_model(
        FILES, model, metrics, lambda m: model_card(m, matrix, fixture_p, generator)
    )
    print(f"  held-out accuracy {metrics['accuracy']}, AUC {metrics['auc']}, confusion:")
    numpy_nn.print_confusion(CLASSES, matrix)
    print(f"generated in {generated:.0f} s, generated and trained in {seconds:.0f} s")


def model_card(
    metrics: dict[str, Any],
    matrix: Labels,
    fixture_p: dict[str, Array],
    generator: ModuleType,
) -> str:
    """MODEL_CARD.md: what the model is for, what it was trained on, how well, and its limits."""
    size = SIZE
    blocks = []
    for out in BLOCKS:
        size //= 2
        blocks.append(
            f"- Conv2d to {out} channels, 3 x 3, padding 1; ReLU; MaxPool 2 x 2 (to {size} x {size})"
        )
    radius = [round(f * SOURCE_SIZE) for f in generator.OPACITY_RADIUS]
    peak = [round(v) for v in generator.OPACITY_PEAK]
    weights = numpy_nn.weight_count(init_params(np.random.default_rng(0)))
    script, epochs, batch, rate, seed = FILES.script, *SCHEDULE
    return f"""# Model card: chest-opacity-cnn (version 1)

Written by `{script}`; do not edit by hand (re-run the script).

**A demonstration trained on synthetic data only.** It has never seen a real radiograph, it is
not clinically validated, and it must not be used for clinical decisions: it is not a
diagnostic device.

## Intended use

A small imaging network with trained weights, served by Triton's `onnxruntime_onnx` platform,
for testing medmesh's imaging path end to end (a study fetched, preprocessed, scored and
reported): one frontal chest-radiograph-like image classified as `no-opacity` or `opacity`.
For testing the medmesh pipeline only.

## Interface

- Input `{INPUT}` FP32 `[batch, 1, {SIZE}, {SIZE}]`: one preprocessed image (below).
- Output `{OUTPUT}` FP32 `[batch, {len(CLASSES)}]`: probabilities of
  {", ".join(f"{k} `{name}`" for k, name in enumerate(CLASSES))}; each row sums to 1.
- ONNX opset {numpy_nn.OPSET}, IR version {numpy_nn.IR_VERSION}; standard operators only.

## Preprocessing the model expects (done before the graph)

1. A {SOURCE_SIZE} x {SOURCE_SIZE} single-frame image, 12 bits stored (values 0-4095),
   photometric interpretation MONOCHROME2 (higher is brighter; invert MONOCHROME1 first), no
   windowing applied beyond the stored values.
2. Resize to {SIZE} x {SIZE} by area averaging: the mean of each 4 x 4 block.
3. Scale to [0, 1]: divide by 4095 (the 12-bit range, not the image's own maximum).
4. FP32, one channel: `[1, {SIZE}, {SIZE}]` per image.

The graph then standardises each image itself (in float64): `(x - mean) / sqrt(var + {EPS:g})`
over the whole image, so a global brightness or contrast change matters little.

## Model

{chr(10).join(blocks)}
- Global average and global max pooling, concatenated; a dense layer to {len(CLASSES)} classes;
  softmax.

{weights} weights, trained in numpy (im2col convolutions, a hand-written backward pass checked
against numerical gradients in tests/unit/test_chest_cnn.py), Adam (learning rate
{rate:g}, halved for the last third of the epochs), mini-batches of {batch},
{epochs} epochs, seed {seed}, one BLAS thread; final training loss {metrics["final_train_loss"]}.

## Training data

Synthetic only: {metrics["train_rows"]} training and {metrics["test_rows"]} held-out images, half
per class, from `synthetic_radiograph(seed, opacity)` of
cli/src/medmesh_cli/devstack/radiographs.py. Each image has its own seed (from {SEED_BASE};
the training and held-out images take consecutive ranges) and none is a fixture's seed. The
generator draws a chest-like picture from geometric shapes: a bright body outline on dark air,
two darker elliptical lung fields, spine, heart shadow, evenly spaced rib-like bands, an
exposure gradient and white noise (20-60 counts), every shape and level drawn per seed. An
opacity is a soft bright disk (radius {radius[0]}-{radius[1]} source pixels, {peak[0]}-{peak[1]} counts brighter at
its centre) inside the inner 60 % of one lung field.

## Held-out metrics ({metrics["test_rows"]} synthetic images)

| metric | value |
|---|---|
| accuracy | {metrics["accuracy"]} |
| sensitivity (opacity) | {metrics["sensitivity"]} |
| specificity (no opacity) | {metrics["specificity"]} |
| sensitivity, opacities of radius below {SMALL_RADIUS:g} source pixels ({metrics["small_opacity_rows"]} images) | {metrics["sensitivity_small_opacity"]} |
| ROC AUC | {metrics["auc"]} |
| log loss | {metrics["log_loss"]} |
| largest difference onnxruntime vs numpy (required below {numpy_nn.ONNX_TOLERANCE:g}) | {metrics["onnx_max_abs_diff"]} |

Confusion matrix at the argmax (rows true class, columns predicted):

{numpy_nn.confusion_table(CLASSES, matrix)}

The held-out fixture images (`OPACITY_FIXTURE_SEEDS` with an opacity, `CLEAR_FIXTURE_SEEDS`
without), which the script refuses to miss:

| fixture | {" | ".join(CLASSES)} |
|---|---|---|
{numpy_nn.probability_rows(fixture_p)}

## Limitations

- Demonstration only. The held-out images come from the same simple generator as the training
  images, so the metrics say how well the network separates that generator's two classes, not
  how it would read radiographs.
- Never trained or evaluated on real images: real chest radiographs (other projections,
  devices, lines and tubes, real pathology of any shape, other bit depths, sizes, windowing and
  processing) are out of distribution, and the network may rely on cues peculiar to the
  generator (a round, uniformly bright blob).
- One finding only (a generic "opacity"); no localisation, no other findings.
- The probabilities are not calibrated beyond the held-out log loss.

{numpy_nn.reproduce_section(metrics)}"""


if __name__ == "__main__":
    main()
