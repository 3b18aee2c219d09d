"""The committed imaging model deploy/triton/models/chest-opacity-cnn (a demonstration).

It is trained by deploy/training/train_chest_cnn.py on synthetic radiograph-like images of
cli/src/medmesh_cli/devstack/radiographs.py; CI never retrains it. These tests check the
committed files: the checksum against metrics.json, the graph against config.pbtxt (parsed with
Triton's own ModelConfig protobuf), the held-out fixture images through the preprocessing the
model card documents (written here again in numpy) with onnxruntime, and the rendering of the
model repository for the local Triton. The numpy network's backward pass is checked against
numerical gradients on a tiny network.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from medmesh_cli.devstack import radiographs as generator
from medmesh_cli.devstack.model_repository import render_model_repository, repository_models
from medmesh_cli.devstack.onnx_runner import OnnxSession, run_requests
from tests.modules import load_file
from tests.onnx_models import assert_cnn_gradients, metrics_numbers

ROOT = Path(__file__).resolve().parents[2]
REPOSITORY = ROOT / "deploy" / "triton" / "models"
MODEL = "chest-opacity-cnn"
MODEL_DIR = REPOSITORY / MODEL
ONNX_PATH = MODEL_DIR / "1" / "model.onnx"
TRAINING = ROOT / "deploy" / "training" / "train_chest_cnn.py"
# onnxruntime, protobuf and tritonclient ship no type information: loaded untyped.
onnxruntime: Any = importlib.import_module("onnxruntime")
text_format: Any = importlib.import_module("google.protobuf.text_format")
model_config_pb2: Any = importlib.import_module("tritonclient.grpc.model_config_pb2")

INPUT, OUTPUT = "IMAGE", "PROBABILITIES"
NO_OPACITY, OPACITY = 0, 1

FIXTURES = [(seed, True, OPACITY) for seed in generator.OPACITY_FIXTURE_SEEDS] + [
    (seed, False, NO_OPACITY) for seed in generator.CLEAR_FIXTURE_SEEDS
]


def preprocess(image: Any) -> Any:
    """MODEL_CARD.md's preprocessing: 256 x 256 12-bit MONOCHROME2, 4 x 4 block means, / 4095."""
    assert image.shape == (256, 256)
    assert image.dtype == np.uint16
    blocks = image.astype(np.float64).reshape(64, 4, 64, 4).mean(axis=(1, 3))
    return (blocks / 4095.0).astype(np.float32)[np.newaxis]


def _metrics() -> dict[str, Any]:
    metrics: dict[str, Any] = json.loads((MODEL_DIR / "metrics.json").read_text())
    return metrics


def _parse_config(path: Path) -> Any:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


@pytest.fixture(scope="module")
def session() -> Any:
    """An onnxruntime CPU session of the committed model."""
    return onnxruntime.InferenceSession(str(ONNX_PATH), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def cnn() -> ModuleType:
    """The training script as a module (its numpy network; nothing is trained)."""
    return load_file(TRAINING, "train_chest_cnn_under_test")


def _run(session: Any, images: Any) -> Any:
    (result,) = session.run([OUTPUT], {INPUT: np.asarray(images, dtype=np.float32)})
    return np.asarray(result)


def test_committed_model_is_the_one_its_metrics_describe() -> None:
    """model.onnx's sha256 is the one in metrics.json and in the card, from the script named there."""
    metrics = _metrics()
    assert hashlib.sha256(ONNX_PATH.read_bytes()).hexdigest() == metrics["sha256"]
    assert (ROOT / metrics["training_script"]).resolve() == TRAINING
    assert (MODEL_DIR / "MODEL_CARD.md").read_text().count(metrics["sha256"]) == 1


def test_metrics_json_is_a_flat_map_of_snake_case_names() -> None:
    """metrics.json maps snake_case names to numbers (plus the checksum and script path); rates in [0, 1]."""
    numbers = metrics_numbers(_metrics())
    for rate in ("accuracy", "sensitivity", "specificity", "auc"):
        assert 0.5 < numbers[rate] <= 1.0, rate
    assert numbers["onnx_max_abs_diff"] <= 1e-5


def test_model_card_says_it_is_a_synthetic_demonstration() -> None:
    """The card says plainly: demonstration, synthetic data only, not for clinical use; and the preprocessing."""
    card = " ".join((MODEL_DIR / "MODEL_CARD.md").read_text().split())
    assert "**A demonstration trained on synthetic data only.**" in card
    assert "must not be used for clinical decisions" in card
    assert "Resize to 64 x 64 by area averaging: the mean of each 4 x 4 block." in card
    assert "divide by 4095" in card
    assert "MONOCHROME2" in card


def test_onnx_checker_accepts_the_graph() -> None:
    """onnx.checker (full check, with shape inference) passes on the committed file."""
    onnx.checker.check_model(onnx.load(ONNX_PATH), full_check=True)


def test_graph_takes_an_image_and_gives_two_probabilities() -> None:
    """One FP32 IMAGE [batch, 1, 64, 64] input and one FP32 PROBABILITIES [batch, 2] output."""
    graph = onnx.load(ONNX_PATH).graph

    def signature(value: onnx.ValueInfoProto) -> tuple[str, int, list[str | int]]:
        tensor = value.type.tensor_type
        dims: list[str | int] = [d.dim_param or d.dim_value for d in tensor.shape.dim]
        return value.name, tensor.elem_type, dims

    fp32 = onnx.TensorProto.FLOAT
    assert [signature(v) for v in graph.input] == [(INPUT, fp32, ["batch", 1, 64, 64])]
    assert [signature(v) for v in graph.output] == [(OUTPUT, fp32, ["batch", 2])]


def test_config_pbtxt_declares_the_graph() -> None:
    """config.pbtxt: onnxruntime platform, the graph's tensors (no batch dim), CPU, all versions,
    and the ECG CNN's batch size and dynamic batching."""
    config = _parse_config(MODEL_DIR / "config.pbtxt")
    ecg = _parse_config(REPOSITORY / "ecg-rhythm-cnn" / "config.pbtxt")
    assert config.name == MODEL
    assert config.platform == "onnxruntime_onnx"
    assert config.backend == ""
    assert config.max_batch_size == ecg.max_batch_size == 32
    assert config.dynamic_batching == ecg.dynamic_batching
    fp32 = model_config_pb2.TYPE_FP32
    assert [(t.name, t.data_type, list(t.dims)) for t in config.input] == [
        (INPUT, fp32, [1, 64, 64])
    ]
    assert [(t.name, t.data_type, list(t.dims)) for t in config.output] == [(OUTPUT, fp32, [2])]
    assert config.version_policy.WhichOneof("policy_choice") == "all"
    cpu = model_config_pb2.ModelInstanceGroup.KIND_CPU
    assert [(g.kind, g.count) for g in config.instance_group] == [(cpu, 1)]
    assert [p.name for p in MODEL_DIR.iterdir() if p.is_dir()] == ["1"]


def test_probabilities_sum_to_one_for_any_batch_size(session: Any) -> None:
    """Every row of PROBABILITIES lies in [0, 1] and sums to 1, for batches of 1 to 32 (a flat image too)."""
    rng = np.random.default_rng(3)
    for batch in (1, 5, 32):
        images = rng.uniform(0.0, 1.0, (batch, 1, 64, 64))
        images[0] = 0.25  # a uniform image: the graph's standardisation must not divide by 0
        probabilities = _run(session, images)
        assert probabilities.shape == (batch, 2)
        assert np.isfinite(probabilities).all()
        assert ((probabilities >= 0) & (probabilities <= 1)).all()
        np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)


def test_documented_preprocessing_is_the_training_scripts(cnn: ModuleType) -> None:
    """The preprocessing written here from the card equals the training script's, to the bit."""
    for seed, opacity, _ in FIXTURES:
        image = generator.synthetic_radiograph(seed, opacity)
        assert np.array_equal(preprocess(image), cnn.preprocess(image))


@pytest.mark.parametrize(("seed", "opacity", "label"), FIXTURES)
def test_cnn_classifies_the_held_out_fixture_images(
    session: Any, seed: int, opacity: bool, label: int
) -> None:
    """Each fixture image (OPACITY_FIXTURE_SEEDS with, CLEAR_FIXTURE_SEEDS without an opacity),
    preprocessed as the card says, gets its class from onnxruntime."""
    image = generator.synthetic_radiograph(seed, opacity)
    probabilities = _run(session, preprocess(image)[np.newaxis])
    assert int(probabilities[0].argmax()) == label


@pytest.mark.parametrize("seed", generator.OPACITY_FIXTURE_SEEDS)
def test_removing_the_opacity_changes_the_answer(session: Any, seed: int) -> None:
    """The same synthetic picture without its opacity is classified no-opacity: the blob decides."""
    images = [preprocess(generator.synthetic_radiograph(seed, flag)) for flag in (True, False)]
    probabilities = _run(session, np.stack(images))
    assert probabilities.argmax(axis=1).tolist() == [OPACITY, NO_OPACITY]


def test_cnn_graph_is_the_numpy_network(session: Any, cnn: ModuleType) -> None:
    """The committed graph's weights in the training script's numpy forward pass give onnxruntime's outputs."""
    graph = onnx.load(ONNX_PATH).graph
    weights = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    params = {k: v for k, v in weights.items() if k.startswith(("conv", "dense"))}
    images = [preprocess(generator.synthetic_radiograph(s, o)) for s, o, _ in FIXTURES]
    rng = np.random.default_rng(11)
    x = np.concatenate([np.stack(images), rng.uniform(0, 1, (3, 1, 64, 64))]).astype(np.float32)
    expected, _ = cnn.forward(params, x)
    np.testing.assert_allclose(_run(session, x), expected, atol=1e-5)


def test_cnn_backward_pass_matches_numerical_gradients(cnn: ModuleType) -> None:
    """On a tiny 2-D network (float64), every analytic gradient equals central differences to 1e-6."""
    assert_cnn_gradients(cnn, blocks=(3, 4), x_shape=(3, 1, 8, 8), labels=[0, 1, 1])


def test_generator_is_deterministic_12_bit_and_synthetic() -> None:
    """synthetic_radiograph: 256 x 256 uint16 within 12 bits, the same per seed, the opacity brightening its lung."""
    first = generator.synthetic_radiograph(101, True)
    assert first.shape == (256, 256)
    assert first.dtype == np.uint16
    assert int(first.max()) <= 4095
    assert np.array_equal(first, generator.synthetic_radiograph(101, True))
    clear = generator.synthetic_radiograph(101, False)
    blob = generator.opacity_geometry(101)
    row, column, radius = round(blob.row), round(blob.column), round(blob.radius / 2)
    inside = np.s_[row - radius : row + radius, column - radius : column + radius]
    difference = first.astype(np.int64) - clear.astype(np.int64)
    assert difference[inside].mean() > 0.5 * blob.peak
    rows, columns = np.indices(first.shape)
    far = np.hypot(rows - blob.row, columns - blob.column) > 3 * blob.radius
    assert np.abs(difference[far]).max() <= 1  # elsewhere the same picture (float rounding aside)


def test_devstack_renders_the_model_for_the_local_triton(tmp_path: Path) -> None:
    """render_model_repository serves chest-opacity-cnn (version 1, the ONNX runner beside the
    graph), and the runner runs batched requests of fixture images as onnxruntime does."""
    rendered = render_model_repository(REPOSITORY, tmp_path / "rendered", gpu_count=0)
    assert repository_models(rendered)[MODEL] == [1]
    folder = rendered / MODEL / "1"
    assert (folder / "model.py").is_file()
    assert (folder / "model.onnx").read_bytes() == ONNX_PATH.read_bytes()
    runner = OnnxSession(folder / "model.onnx")
    images = [preprocess(generator.synthetic_radiograph(s, o))[np.newaxis] for s, o, _ in FIXTURES]
    results = run_requests(runner, [{INPUT: image} for image in images], [OUTPUT])
    labels = []
    for result in results:
        assert isinstance(result, dict)
        labels.append(int(result[OUTPUT][0].argmax()))
    assert labels == [label for _, _, label in FIXTURES]
    gpu = render_model_repository(REPOSITORY, tmp_path / "gpu", gpu_count=1)
    config = _parse_config(gpu / MODEL / "config.pbtxt")
    assert [g.kind for g in config.instance_group] == [model_config_pb2.ModelInstanceGroup.KIND_GPU]
