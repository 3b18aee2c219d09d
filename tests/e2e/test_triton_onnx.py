"""ONNX models and explicit model control on the real local tritonserver (nvidia-pytriton wheel).

One ``TritonServer`` for this module, on its own ports (MEDMESH_E2E_PORT_BASE + 700..702), serving
a repository of tiny ONNX classifiers (tests/onnx_models.py) with ``platform: "onnxruntime_onnx"``:
the launcher renders them as python-backend models running medmesh_cli.devstack.onnx_runner,
since this tritonserver has no onnxruntime backend. Inference goes over gRPC, as the workers'.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from medmesh_cli.devstack.triton import TritonPorts, TritonServer, is_model_ready
from tests.e2e.conftest import E2E_PORT_BASE
from tests.onnx_models import (
    INPUT,
    OUTPUTS,
    add_version,
    onnx_model_folder,
    reference_outputs,
    rows,
)

ONNX_PORT_BASE = E2E_PORT_BASE + 700
Array = npt.NDArray[Any]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    """tritonserver on a repository of two ONNX models: ``classifier`` (versions 1 and 2) and
    ``loose`` (config dims [-1]: Triton lets any width through, the model must refuse it)."""
    base = tmp_path_factory.mktemp("triton-onnx")
    repository = base / "models"
    onnx_model_folder(repository, "classifier", versions=(1, 2))
    onnx_model_folder(repository, "loose", config_width=-1, queue_delay_us=100_000)
    triton = TritonServer(
        repository,
        ports=TritonPorts(ONNX_PORT_BASE, ONNX_PORT_BASE + 1, ONNX_PORT_BASE + 2),
        work_dir=base / "work",
        log=base / "tritonserver.log",
    )
    triton.start()
    yield triton
    triton.stop()


@pytest.fixture
def client(server: TritonServer) -> Iterator[Any]:
    """A gRPC client of the module's server."""
    grpc = grpcclient.InferenceServerClient(server.grpc_url)
    yield grpc
    grpc.close()


def infer(client: Any, model: str, x: Array, version: str = "") -> dict[str, Array]:
    """Every output of one gRPC inference of ``X`` = ``x``."""
    tensor = grpcclient.InferInput(INPUT, list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    result = client.infer(model, [tensor], model_version=version)
    return {name: result.as_numpy(name) for name in OUTPUTS}


def assert_outputs(got: dict[str, Array], expected: dict[str, Array]) -> None:
    """Same outputs, datatypes and shapes; values as onnxruntime computes them."""
    assert set(got) == set(expected)
    for name, value in expected.items():
        assert got[name].dtype == value.dtype, name
        assert got[name].shape == value.shape, name
        np.testing.assert_allclose(got[name], value, rtol=1e-6, atol=1e-7, err_msg=name)


def test_rendered_onnx_model_answers_like_onnxruntime(server: TritonServer, client: Any) -> None:
    """Both versions of an onnxruntime_onnx model infer over gRPC with onnxruntime's outputs."""
    assert server.served_repository is not None
    x = rows(5)
    for version in ("1", "2"):
        path = server.model_repository / "classifier" / version / "model.onnx"
        assert_outputs(infer(client, "classifier", x, version), reference_outputs(path, x))
    metadata = client.get_model_metadata("classifier", as_json=True)
    assert [(t["name"], t["datatype"], t["shape"]) for t in metadata["outputs"]] == [
        ("LOGITS", "FP32", ["-1", "3"]),
        ("PROBS", "FP32", ["-1", "3"]),
        ("CLASS", "INT64", ["-1", "1"]),
    ]


def test_concurrent_requests_share_a_batch_and_a_bad_one_fails_alone(
    server: TritonServer, client: Any
) -> None:
    """Concurrent requests are answered from shared executions; a request of the wrong width
    gets the runner's error while the others get onnxruntime's outputs and the model stays up."""
    path = server.model_repository / "loose" / "1" / "model.onnx"
    inputs = [rows(1 + i % 3, seed=i) for i in range(8)]
    bad = rows(2, width=3)
    before = client.get_inference_statistics("loose", as_json=True)["model_stats"][0]
    with concurrent.futures.ThreadPoolExecutor(max_workers=9) as pool:
        good = [pool.submit(infer, client, "loose", x) for x in inputs]
        failing = pool.submit(infer, client, "loose", bad)
        for future, x in zip(good, inputs, strict=True):
            assert_outputs(future.result(), reference_outputs(path, x))
        with pytest.raises(InferenceServerException, match=r"dimension 1 is 3, not 4"):
            failing.result()
    after = client.get_inference_statistics("loose", as_json=True)["model_stats"][0]
    executions = int(after.get("execution_count", 0)) - int(before.get("execution_count", 0))
    seen = int(after.get("inference_count", 0)) - int(before.get("inference_count", 0))
    assert seen == sum(len(x) for x in inputs) + len(bad)
    assert 1 <= executions < len(inputs) + 1  # fewer executions than the 9 requests
    assert client.is_model_ready("loose")


def test_a_model_is_added_reloaded_with_a_new_version_and_unloaded_while_serving(
    server: TritonServer, client: Any
) -> None:
    """Explicit model control: render and load a new model, infer it, add version 2 and load
    again (served), unload it (not ready); the other models and the process stay."""
    pid = server.pid
    source = onnx_model_folder(server.model_repository, "newcomer", versions=(1,))
    assert not is_model_ready(server.http_url, "newcomer")
    server.render_model("newcomer")
    assert server.load_model("newcomer") == [1]
    x = rows(3, seed=11)
    assert_outputs(infer(client, "newcomer", x), reference_outputs(source / "1" / "model.onnx", x))

    add_version(source, 2)
    server.render_model("newcomer")
    assert server.load_model("newcomer") == [1, 2]
    assert client.is_model_ready("newcomer", "2")
    assert_outputs(
        infer(client, "newcomer", x, "2"), reference_outputs(source / "2" / "model.onnx", x)
    )

    server.unload_model("newcomer")
    assert not client.is_model_ready("newcomer")
    assert not client.is_model_ready("newcomer", "2")
    assert client.is_model_ready("classifier")
    assert server.pid == pid
    assert server.is_running()


def test_a_model_from_elsewhere_is_served_under_its_folder_name(
    server: TritonServer, client: Any, tmp_path: Path
) -> None:
    """render_model(name, source=folder) serves a model folder kept outside the repository."""
    folder = onnx_model_folder(tmp_path, "visitor", versions=(3,))
    server.render_model("visitor", source=folder)
    assert server.load_model("visitor") == [3]
    x = rows(2, seed=5)
    assert_outputs(infer(client, "visitor", x), reference_outputs(folder / "3" / "model.onnx", x))
    assert server.added_models == {"visitor": folder}
    server.unload_model("visitor")


def test_loading_a_model_the_repository_lacks_fails_with_tritons_reason(
    server: TritonServer,
) -> None:
    """load_model of a name with no folder raises RuntimeError naming it; the server runs on."""
    with pytest.raises(RuntimeError, match=r"could not load model absent.*failed to load 'absent'"):
        server.load_model("absent")
    assert server.is_running()
