"""The committed ONNX models (deploy/triton/models/{deterioration-gbt,ecg-rhythm-cnn}/1/model.onnx).

They are trained by deploy/training/ on synthetic data; CI never retrains them. These tests check
the committed files: their checksums against metrics.json, their graphs against config.pbtxt
(parsed with Triton's own ModelConfig protobuf), and their outputs with onnxruntime on the FHIR
fixtures. The numpy CNN's backward pass is checked against numerical gradients on a tiny network.
Nothing here imports scikit-learn (the optional ``train`` group).
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

from medmesh_contracts.events import FhirVersion
from medmesh_contracts.modelspec import ModelSpec, load_spec
from tests.ingest_support import ingest
from tests.modules import load_file
from tests.onnx_models import assert_cnn_gradients, metrics_numbers

ROOT = Path(__file__).resolve().parents[2]
REPOSITORY = ROOT / "deploy" / "triton" / "models"
FIXTURES = ROOT / "tests" / "fixtures" / "fhir"
ECG_TRAINING = ROOT / "deploy" / "training" / "train_ecg_cnn.py"
# onnxruntime, protobuf and tritonclient ship no type information: loaded untyped.
onnxruntime: Any = importlib.import_module("onnxruntime")
text_format: Any = importlib.import_module("google.protobuf.text_format")
model_config_pb2: Any = importlib.import_module("tritonclient.grpc.model_config_pb2")

# model folder -> (input name, input width, output name, classes, max_batch_size)
MODELS = {
    "deterioration-gbt": ("VITALS", 7, "PROBABILITIES", 2, 64),
    "ecg-rhythm-cnn": ("ECG", 2500, "PROBABILITIES", 3, 32),
}
REGULAR, IRREGULAR, UNREADABLE = 0, 1, 2
# The vitals fixtures' model inputs, read by hand from tests/fixtures/fhir/EXPECTED.md (columns:
# respiratory rate, SpO2, oxygen, temperature Cel, systolic BP, heart rate, not alert).
VITALS = {
    "low": [16.0, 97.0, 0.0, 35.8, 124.0, 72.0, 0.0],  # vitals-bundle-low.json, NEWS2 1
    "medium": [22.0, 95.0, 1.0, 37.9, 112.0, 92.0, 0.0],  # vitals-bundle-medium.json, NEWS2 6
    "high": [24.0, 91.0, 1.0, 38.5, 98.0, 118.0, 1.0],  # vitals-bundle-high.json, NEWS2 15
}
ECG_FIXTURES = [
    ("ecg-sinus.json", "R4B", REGULAR),
    ("ecg-af.json", "R4B", IRREGULAR),
    ("ecg-sinus-r5.json", "R5", REGULAR),
    ("ecg-af-r5.json", "R5", IRREGULAR),
]


def _onnx_path(model: str) -> Path:
    return REPOSITORY / model / "1" / "model.onnx"


def _metrics(model: str) -> dict[str, Any]:
    metrics: dict[str, Any] = json.loads((REPOSITORY / model / "metrics.json").read_text())
    return metrics


@pytest.fixture(scope="module")
def sessions() -> dict[str, Any]:
    """An onnxruntime CPU session of each committed model."""
    return {
        model: onnxruntime.InferenceSession(
            str(_onnx_path(model)), providers=["CPUExecutionProvider"]
        )
        for model in MODELS
    }


@pytest.fixture(scope="module")
def cnn() -> ModuleType:
    """The ECG training script as a module (its numpy network; nothing is trained)."""
    return load_file(ECG_TRAINING, "train_ecg_cnn_under_test")


def _run(sessions: dict[str, Any], model: str, rows: Any) -> Any:
    name, _, output, _, _ = MODELS[model]
    (result,) = sessions[model].run([output], {name: np.asarray(rows, dtype=np.float32)})
    return np.asarray(result)


@pytest.mark.parametrize("model", sorted(MODELS))
def test_committed_model_is_the_one_its_metrics_describe(model: str) -> None:
    """model.onnx's sha256 is the one in metrics.json, written by the training script named there."""
    metrics = _metrics(model)
    assert hashlib.sha256(_onnx_path(model).read_bytes()).hexdigest() == metrics["sha256"]
    assert (ROOT / metrics["training_script"]).is_file()


@pytest.mark.parametrize("model", sorted(MODELS))
def test_metrics_json_is_a_flat_map_of_snake_case_names(model: str) -> None:
    """metrics.json maps snake_case names to numbers (plus the checksum and script path)."""
    metrics = _metrics(model)
    metrics_numbers(metrics)
    assert (REPOSITORY / model / "MODEL_CARD.md").read_text().count(metrics["sha256"]) == 1


@pytest.mark.parametrize("model", sorted(MODELS))
def test_onnx_checker_accepts_the_graph(model: str) -> None:
    """onnx.checker (full check, with shape inference) passes on the committed file."""
    onnx.checker.check_model(onnx.load(_onnx_path(model)), full_check=True)


@pytest.mark.parametrize("model", sorted(MODELS))
def test_graph_has_one_fp32_input_and_one_fp32_output(model: str) -> None:
    """One FP32 [batch, width] input and one FP32 [batch, classes] output, named as Triton expects."""
    graph = onnx.load(_onnx_path(model)).graph
    name, width, output, classes, _ = MODELS[model]

    def signature(value: onnx.ValueInfoProto) -> tuple[str, int, list[str | int]]:
        tensor = value.type.tensor_type
        dims: list[str | int] = [d.dim_param or d.dim_value for d in tensor.shape.dim]
        return value.name, tensor.elem_type, dims

    assert [signature(v) for v in graph.input] == [(name, onnx.TensorProto.FLOAT, ["batch", width])]
    assert [signature(v) for v in graph.output] == [
        (output, onnx.TensorProto.FLOAT, ["batch", classes])
    ]


@pytest.mark.parametrize("model", sorted(MODELS))
def test_config_pbtxt_declares_the_graph(model: str) -> None:
    """config.pbtxt: onnxruntime platform, the graph's tensors (no batch dim), CPU, all versions."""
    config = text_format.Parse(
        (REPOSITORY / model / "config.pbtxt").read_text(), model_config_pb2.ModelConfig()
    )
    name, width, output, classes, max_batch_size = MODELS[model]
    assert config.name == model
    assert config.platform == "onnxruntime_onnx"
    assert config.backend == ""
    assert config.max_batch_size == max_batch_size
    fp32 = model_config_pb2.TYPE_FP32
    assert [(t.name, t.data_type, list(t.dims)) for t in config.input] == [(name, fp32, [width])]
    assert [(t.name, t.data_type, list(t.dims)) for t in config.output] == [
        (output, fp32, [classes])
    ]
    assert config.version_policy.WhichOneof("policy_choice") == "all"
    assert config.dynamic_batching.max_queue_delay_microseconds == 2000
    cpu = model_config_pb2.ModelInstanceGroup.KIND_CPU
    assert [(g.kind, g.count) for g in config.instance_group] == [(cpu, 1)]
    versions = [p.name for p in (REPOSITORY / model).iterdir() if p.is_dir()]
    assert versions == ["1"]


@pytest.mark.parametrize("model", sorted(MODELS))
def test_probabilities_sum_to_one_for_any_batch_size(sessions: dict[str, Any], model: str) -> None:
    """Every row of PROBABILITIES lies in [0, 1] and sums to 1, for batches of 1 to max_batch_size."""
    _, width, _, classes, max_batch_size = MODELS[model]
    rng = np.random.default_rng(3)
    for batch in (1, 5, max_batch_size):
        if model == "deterioration-gbt":
            low, high = [4, 60, 0, 32, 50, 25, 0], [50, 100, 1, 42, 260, 200, 1]
            rows = np.round(rng.uniform(low, high, (batch, width)))
        else:
            rows = rng.normal(0.0, 0.5, (batch, width))
        probabilities = _run(sessions, model, rows)
        assert probabilities.shape == (batch, classes)
        assert ((probabilities >= 0) & (probabilities <= 1)).all()
        np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)


def test_gbt_probability_rises_with_the_news2_band(sessions: dict[str, Any]) -> None:
    """The vitals fixtures' deterioration probabilities order as their NEWS2 bands: low < medium < high."""
    probabilities = _run(sessions, "deterioration-gbt", list(VITALS.values()))
    low, medium, high = probabilities[:, 1]
    assert low < medium < high
    assert low < 0.1
    assert high > 0.5


def _ecg_row(name: str, version: FhirVersion, spec: ModelSpec) -> Any:
    """A committed ECG fixture as ingest sends it for a score: the tensor row the worker sends."""
    raw = (FIXTURES / name).read_bytes()
    (request,) = ingest(raw, {spec.name: spec}, fhir_version=version).requests
    (lead,) = request.inputs
    assert lead.samples is not None
    return np.asarray(lead.samples, dtype=np.float32)


@pytest.mark.parametrize(("name", "version", "rhythm"), ECG_FIXTURES)
def test_cnn_classifies_the_committed_ecg_fixtures(
    sessions: dict[str, Any], name: str, version: FhirVersion, rhythm: int
) -> None:
    """Each committed ECG fixture, read by ingest, gets its rhythm's class with probability > 0.9."""
    spec = load_spec(ROOT / "deploy" / "models" / "ecg-rhythm.yaml")
    probabilities = _run(sessions, "ecg-rhythm-cnn", _ecg_row(name, version, spec)[np.newaxis])
    assert int(probabilities[0].argmax()) == rhythm
    assert probabilities[0, rhythm] > 0.9


def test_cnn_calls_flat_lines_and_noise_unreadable(sessions: dict[str, Any]) -> None:
    """A flat line (0 mV, or 1 mV constant) and white noise of 0.15 mV are classified unreadable."""
    rows = np.stack(
        [
            np.zeros(2500),
            np.ones(2500),
            np.random.default_rng(7).normal(0.0, 0.15, 2500),
        ]
    )
    assert _run(sessions, "ecg-rhythm-cnn", rows).argmax(axis=1).tolist() == [UNREADABLE] * 3


def test_cnn_graph_is_the_numpy_network(sessions: dict[str, Any], cnn: ModuleType) -> None:
    """The committed graph's weights in the training script's numpy forward pass give onnxruntime's outputs."""
    graph = onnx.load(_onnx_path("ecg-rhythm-cnn")).graph
    weights = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    params = {k: v for k, v in weights.items() if k.startswith(("conv", "dense"))}
    rng = np.random.default_rng(11)
    rows = np.concatenate(
        [rng.normal(0.0, 0.3, (4, 2500)), np.stack([cnn.unreadable_ecg(s) for s in range(4)])]
    ).astype(np.float32)
    expected, _ = cnn.forward(params, rows)
    np.testing.assert_allclose(_run(sessions, "ecg-rhythm-cnn", rows), expected, atol=1e-5)


def test_cnn_backward_pass_matches_numerical_gradients(cnn: ModuleType) -> None:
    """On a tiny network (float64), every analytic gradient equals central differences to 1e-6."""
    blocks = ((3, 5, 2, 2), (4, 3, 1, 2), (5, 3, 1, 2))
    assert_cnn_gradients(cnn, blocks, x_shape=(4, 64), labels=[0, 1, 2, 1])
