"""The ONNX runner of the local Triton (medmesh_cli.devstack.onnx_runner), without Triton.

Its core (``OnnxSession``, ``run_requests``) is checked against onnxruntime's own
``InferenceSession`` on tiny models built by tests/onnx_models.py; ``TritonPythonModel`` against a
stand-in for Triton's ``triton_python_backend_utils`` fed the config the renderer writes, as
Triton's python backend hands it over (JSON). tests/e2e/test_triton_onnx.py runs it in Triton.
"""

from __future__ import annotations

import importlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from medmesh_cli.devstack.model_repository import read_config, render_model_repository
from medmesh_cli.devstack.onnx_runner import (
    CPU_PROVIDER,
    CUDA_PROVIDER,
    OnnxSession,
    TritonPythonModel,
    execution_providers,
    run_requests,
)
from tests.onnx_models import INPUT, OUTPUTS, onnx_model_folder, reference_outputs, rows
from tests.onnx_models import softmax_model as build_softmax

json_format: Any = importlib.import_module("google.protobuf.json_format")
onnx: Any = importlib.import_module("onnx")

Array = npt.NDArray[Any]


@pytest.fixture
def model_path(tmp_path: Path) -> Path:
    """A classifier X [n, 4] -> LOGITS, PROBS [n, 3], CLASS [n, 1] with a free batch dimension."""
    path = tmp_path / "model.onnx"
    onnx.save(build_softmax(4, 3, seed=1), path)
    return path


class CountingSession:
    """Wraps an onnxruntime session and counts its runs (how many batches reached it)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.runs: list[int] = []

    def run(self, names: list[str], feeds: dict[str, Array]) -> list[Any]:
        """Run, recording the rows of the run."""
        self.runs.append(len(feeds[INPUT]))
        return list(self.inner.run(names, feeds))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_session_outputs_equal_onnxruntimes_own(model_path: Path) -> None:
    """OnnxSession.run gives exactly what onnxruntime's InferenceSession gives on the same rows."""
    x = rows(16)
    session = OnnxSession(model_path)
    got = session.run({INPUT: x})
    expected = reference_outputs(model_path, x)
    assert list(got) == list(OUTPUTS)
    for name in OUTPUTS:
        np.testing.assert_array_equal(got[name], expected[name])
        assert got[name].dtype == expected[name].dtype
    assert session.run({INPUT: x}, ["CLASS"]).keys() == {"CLASS"}
    assert session.provider == CPU_PROVIDER
    assert session.batched


def test_session_refuses_inputs_that_do_not_fit_the_graph(model_path: Path) -> None:
    """Missing, unknown, wrongly typed, wrongly ranked or wrongly wide inputs: ValueError."""
    session = OnnxSession(model_path)
    x = rows(2)
    cases: list[tuple[dict[str, Array], str]] = [
        ({}, "missing"),
        ({INPUT: x, "Y": x}, "unknown"),
        ({INPUT: x.astype(np.float64)}, "must be float32"),
        ({INPUT: x[0]}, "2 dimensions"),
        ({INPUT: rows(2, width=5)}, r"dimension 1 is 5, not 4"),
    ]
    for inputs, message in cases:
        with pytest.raises(ValueError, match=message):
            session.run(inputs)
    with pytest.raises(ValueError, match="no outputs"):
        session.run({INPUT: x}, ["NOPE"])


def test_requests_are_run_as_one_batch_and_split_back(model_path: Path) -> None:
    """Requests of one execute call run as one session run; each gets its own rows' outputs."""
    session = OnnxSession(model_path)
    counting = CountingSession(session._session)
    session._session = counting
    requests = [{INPUT: rows(n, seed=n)} for n in (1, 3, 2)]
    results = run_requests(session, requests, OUTPUTS)
    assert counting.runs == [6]
    for request, result in zip(requests, results, strict=True):
        assert isinstance(result, dict)
        expected = reference_outputs(model_path, request[INPUT])
        for name in OUTPUTS:
            assert result[name].shape[0] == request[INPUT].shape[0]
            np.testing.assert_allclose(result[name], expected[name], rtol=1e-6, atol=1e-7)


def test_a_bad_request_fails_alone(model_path: Path) -> None:
    """A request of the wrong shape or datatype gets its own error; the others their outputs."""
    session = OnnxSession(model_path)
    good = rows(2)
    requests: list[dict[str, Array]] = [
        {INPUT: good},
        {INPUT: rows(2, width=3)},
        {INPUT: good.astype(np.int32)},
        {INPUT: good},
    ]
    results = run_requests(session, requests, ["PROBS"])
    assert isinstance(results[1], ValueError)
    assert "dimension 1 is 3, not 4" in str(results[1])
    assert isinstance(results[2], ValueError)
    assert "must be float32" in str(results[2])
    for i in (0, 3):
        result = results[i]
        assert isinstance(result, dict)
        np.testing.assert_allclose(
            result["PROBS"], reference_outputs(model_path, good)["PROBS"], rtol=1e-6
        )


def test_a_failing_batch_is_run_again_request_by_request(model_path: Path) -> None:
    """When onnxruntime fails on the stacked batch, each request runs alone: only the request
    onnxruntime fails on gets an error."""
    session = OnnxSession(model_path)
    inner = session._session

    class Flaky:
        """Fails on any run that holds a NaN, like an operator refusing a value."""

        def run(self, names: list[str], feeds: dict[str, Array]) -> list[Any]:
            if np.isnan(feeds[INPUT]).any():
                raise RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : bad value")
            return list(inner.run(names, feeds))

        def __getattr__(self, name: str) -> Any:
            return getattr(inner, name)

    session._session = Flaky()
    poisoned = rows(2)
    poisoned[1, 0] = np.nan
    results = run_requests(
        session, [{INPUT: rows(1)}, {INPUT: poisoned}, {INPUT: rows(3)}], OUTPUTS
    )
    assert isinstance(results[0], dict)
    assert isinstance(results[2], dict)
    assert isinstance(results[1], RuntimeError)
    assert "onnxruntime failed" in str(results[1])


def test_fixed_batch_graphs_run_request_by_request(tmp_path: Path) -> None:
    """A graph whose first dimension is fixed is never stacked: one run per request."""
    path = tmp_path / "fixed.onnx"
    onnx.save(build_softmax(4, 3, seed=2, batch=1), path)
    session = OnnxSession(path)
    assert not session.batched
    counting = CountingSession(session._session)
    session._session = counting
    results = run_requests(session, [{INPUT: rows(1, seed=s)} for s in range(3)], OUTPUTS)
    assert counting.runs == [1, 1, 1]
    assert all(isinstance(r, dict) for r in results)
    assert session.inputs[INPUT].shape == (1, 4)


def test_unbatched_models_run_each_request_alone(model_path: Path) -> None:
    """batching=False (max_batch_size 0): one session run per request."""
    session = OnnxSession(model_path)
    counting = CountingSession(session._session)
    session._session = counting
    run_requests(session, [{INPUT: rows(2)}, {INPUT: rows(2)}], OUTPUTS, batching=False)
    assert counting.runs == [2, 2]


def test_gpu_instances_use_cuda_only_where_onnxruntime_offers_it(model_path: Path) -> None:
    """A GPU instance runs on CUDA (its device, CPU as fallback) when the provider is there,
    else on the CPU; a CPU instance always on the CPU."""
    assert execution_providers("gpu", 1, [CUDA_PROVIDER, CPU_PROVIDER]) == [
        (CUDA_PROVIDER, {"device_id": "1"}),
        CPU_PROVIDER,
    ]
    assert execution_providers("gpu", 0, [CPU_PROVIDER]) == [CPU_PROVIDER]
    assert execution_providers("cpu", 0, [CUDA_PROVIDER, CPU_PROVIDER]) == [CPU_PROVIDER]
    ort: Any = importlib.import_module("onnxruntime")
    session = OnnxSession(model_path, "gpu", 0)
    cuda = CUDA_PROVIDER in ort.get_available_providers()
    assert session.provider == (CUDA_PROVIDER if cuda else CPU_PROVIDER)


def test_a_folder_is_read_as_its_model_onnx(tmp_path: Path) -> None:
    """A model.onnx folder (ONNX with external data, as Triton accepts) opens its model.onnx."""
    folder = tmp_path / "model.onnx"
    folder.mkdir()
    onnx.save(build_softmax(), folder / "model.onnx")
    assert OnnxSession(folder).path == folder / "model.onnx"


# --- TritonPythonModel against a stand-in for triton_python_backend_utils -------------------------


@dataclass
class FakeTensor:
    """pb_utils.Tensor: a name and a numpy array."""

    name: str
    array: Array

    def as_numpy(self) -> Array:
        """The array."""
        return self.array


@dataclass
class FakeResponse:
    """pb_utils.InferenceResponse."""

    output_tensors: list[FakeTensor]
    error: Any = None


@dataclass
class FakeError:
    """pb_utils.TritonError."""

    message: str


@dataclass
class FakeRequest:
    """A request: its input tensors by name."""

    inputs: dict[str, Array] = field(default_factory=dict)


def fake_pb_utils() -> SimpleNamespace:
    """What the runner uses of triton_python_backend_utils."""
    logged: list[str] = []

    def get_input_tensor_by_name(request: FakeRequest, name: str) -> FakeTensor | None:
        array = request.inputs.get(name)
        return None if array is None else FakeTensor(name, array)

    return SimpleNamespace(
        Tensor=FakeTensor,
        InferenceResponse=FakeResponse,
        TritonError=FakeError,
        get_input_tensor_by_name=get_input_tensor_by_name,
        Logger=SimpleNamespace(log_info=logged.append),
        logged=logged,
    )


def triton_args(rendered_model: Path, version: int, kind: str = "CPU") -> dict[str, str]:
    """The ``args`` Triton's python backend passes to ``initialize`` for one instance."""
    config = json_format.MessageToDict(
        read_config(rendered_model), preserving_proto_field_name=True
    )
    return {
        "model_config": json.dumps(config),
        "model_instance_kind": kind,
        "model_instance_name": f"{rendered_model.name}_0_0",
        "model_instance_device_id": "0",
        "model_repository": str(rendered_model),
        "model_version": str(version),
        "model_name": rendered_model.name,
    }


def test_triton_model_answers_each_request_from_the_rendered_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """TritonPythonModel opens the rendered version's model.onnx, answers every request with
    onnxruntime's outputs, and gives a bad request a TritonError of its own."""
    pb = fake_pb_utils()
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", pb)
    onnx_model_folder(tmp_path / "source", "classifier", versions=(1, 2))
    rendered = render_model_repository(tmp_path / "source", tmp_path / "rendered", 0)
    model = TritonPythonModel()
    model.initialize(triton_args(rendered / "classifier", 2))
    assert model.batching
    assert "model.onnx on CPUExecutionProvider" in pb.logged[0]
    good = [rows(2, seed=1), rows(1, seed=2)]
    requests = [FakeRequest({INPUT: good[0]}), FakeRequest({}), FakeRequest({INPUT: good[1]})]
    responses = model.execute(requests)
    assert len(responses) == 3
    assert "missing ['X']" in responses[1].error.message
    assert responses[1].output_tensors == []
    for response, x in zip((responses[0], responses[2]), good, strict=True):
        assert response.error is None
        got = {t.name: t.array for t in response.output_tensors}
        assert list(got) == list(OUTPUTS)
        expected = reference_outputs(rendered / "classifier" / "2" / "model.onnx", x)
        for name in OUTPUTS:
            np.testing.assert_allclose(got[name], expected[name], rtol=1e-6, atol=1e-7)
    model.finalize()


def test_triton_model_on_a_gpu_instance_falls_back_to_the_cpu_without_cuda(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A KIND_GPU instance asks for CUDA; with a CPU-only onnxruntime it runs on the CPU."""
    pb = fake_pb_utils()
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", pb)
    onnx_model_folder(tmp_path / "source", "classifier")
    rendered = render_model_repository(tmp_path / "source", tmp_path / "rendered", 1)
    model = TritonPythonModel()
    model.initialize(triton_args(rendered / "classifier", 1, kind="GPU"))
    ort: Any = importlib.import_module("onnxruntime")
    cuda = CUDA_PROVIDER in ort.get_available_providers()
    assert model.session.provider == (CUDA_PROVIDER if cuda else CPU_PROVIDER)
    assert "instance kind GPU" in pb.logged[0]


def test_triton_model_refuses_to_load_a_config_naming_tensors_the_graph_lacks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An output the ONNX graph does not have fails initialize (the load), naming it."""
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", fake_pb_utils())
    folder = onnx_model_folder(tmp_path / "source", "classifier")
    config = folder / "config.pbtxt"
    config.write_text(config.read_text().replace('name: "PROBS"', 'name: "SCORES"'))
    rendered = render_model_repository(tmp_path / "source", tmp_path / "rendered", 0)
    with pytest.raises(ValueError, match=r"declares outputs \['SCORES'\]"):
        TritonPythonModel().initialize(triton_args(rendered / "classifier", 1))
