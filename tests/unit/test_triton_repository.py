"""The Triton model repository (deploy/triton/models) and the launcher's repository helpers.

config.pbtxt is parsed with Triton's own ModelConfig protobuf (shipped in tritonclient), so a
typo that Triton would reject fails here. Nothing in this file starts Triton.
"""

from __future__ import annotations

import ast
import importlib
import os
import socket
import sys
import sysconfig
from pathlib import Path
from typing import Any

import pytest

from medmesh_cli.devstack.triton import (
    TritonPorts,
    TritonServer,
    port_in_use,
    prepare_backend_directory,
    render_config,
    render_model_repository,
    repository_models,
    served_versions,
    triton_environment,
)
from medmesh_contracts.modelspec import ModelSpec, load_specs

ROOT = Path(__file__).resolve().parents[2]
REPOSITORY = ROOT / "deploy" / "triton" / "models"
MODEL_DIR = REPOSITORY / "deterioration"
# protobuf and tritonclient ship no type information: loaded untyped.
text_format: Any = importlib.import_module("google.protobuf.text_format")
model_config_pb2: Any = importlib.import_module("tritonclient.grpc.model_config_pb2")
# What a model.py may import to load unchanged in NVIDIA's Triton container.
ALLOWED_IMPORTS = {
    "__future__",
    "numpy",
    "numpy.typing",
    "json",
    "pathlib",
    "importlib",
    "typing",
}
SPECS = load_specs(ROOT / "deploy" / "models")
MODEL_FILES = sorted(REPOSITORY.glob("*/*/model.py"))


def parse(text: str) -> Any:
    """A config.pbtxt text as Triton's ModelConfig message."""
    return text_format.Parse(text, model_config_pb2.ModelConfig())


@pytest.fixture(scope="module", params=sorted(SPECS))
def spec(request: pytest.FixtureRequest) -> ModelSpec:
    """Each deployed model's spec (deploy/models/*.yaml)."""
    return SPECS[request.param]


@pytest.fixture(scope="module")
def config(spec: ModelSpec) -> Any:
    """The config.pbtxt of the spec's Triton model, parsed."""
    return parse((REPOSITORY / spec.triton.model / "config.pbtxt").read_text())


def test_config_tensors_agree_with_the_model_spec(spec: ModelSpec, config: Any) -> None:
    """Model name, batch size, tensor names, types and dims match the model's spec (a waveform
    input fills as many columns as its samples; contributions as the spec lists them)."""
    assert config.name == spec.triton.model
    assert config.backend == "python"
    assert config.max_batch_size == spec.triton.max_batch_size
    inputs = {t.name: (t.data_type, list(t.dims)) for t in config.input}
    assert inputs == {spec.triton.input_tensor: (model_config_pb2.TYPE_FP32, [spec.input_width])}
    outputs = {t.name: (t.data_type, list(t.dims)) for t in config.output}
    assert outputs == {
        spec.triton.score_tensor: (model_config_pb2.TYPE_FP32, [1]),
        spec.triton.band_tensor: (model_config_pb2.TYPE_INT32, [1]),
        spec.triton.contributions_tensor: (
            model_config_pb2.TYPE_FP32,
            [spec.contributions_width],
        ),
    }


def test_config_serves_every_spec_version_on_cpu(spec: ModelSpec, config: Any) -> None:
    """All versions are served, each spec version has a folder, batching is dynamic, on CPU."""
    model_dir = REPOSITORY / spec.triton.model
    assert config.version_policy.WhichOneof("policy_choice") == "all"
    assert served_versions(model_dir) == sorted(v.triton_version for v in spec.versions)
    for version in spec.versions:
        assert (model_dir / str(version.triton_version) / "model.py").is_file()
    assert config.dynamic_batching.max_queue_delay_microseconds == 2000
    assert [(g.kind, g.count) for g in config.instance_group] == [
        (model_config_pb2.ModelInstanceGroup.KIND_CPU, 1)
    ]


def test_bands_of_the_models_are_the_spec_bands() -> None:
    """The specs declare exactly the band values the models emit: deterioration 0-3 (RISK_BAND),
    ecg-rhythm 0-2 (RHYTHM_BAND: regular, irregular, unreadable)."""
    bands = {name: sorted(b.index for b in spec.bands) for name, spec in SPECS.items()}
    assert bands == {"deterioration": [0, 1, 2, 3], "ecg-rhythm": [0, 1, 2]}


@pytest.mark.parametrize("model_file", MODEL_FILES, ids=lambda p: "/".join(p.parts[-3:-1]))
def test_model_files_import_only_what_the_triton_container_has(model_file: Path) -> None:
    """model.py imports numpy and the standard library only (Triton's utils lazily)."""
    tree = ast.parse(model_file.read_text())
    imported: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
    assert imported <= ALLOWED_IMPORTS


def test_render_for_two_gpus_gives_one_gpu_instance_each(tmp_path: Path) -> None:
    """gpu_count=2: instance_group becomes KIND_GPU on gpus [0] and [1]; the rest is unchanged."""
    rendered = render_model_repository(REPOSITORY, tmp_path / "rendered", gpu_count=2)
    config = parse((rendered / "deterioration" / "config.pbtxt").read_text())
    groups = [(g.kind, g.count, list(g.gpus)) for g in config.instance_group]
    gpu = model_config_pb2.ModelInstanceGroup.KIND_GPU
    assert groups == [(gpu, 1, [0]), (gpu, 1, [1])]
    original = parse((MODEL_DIR / "config.pbtxt").read_text())
    del config.instance_group[:]
    del original.instance_group[:]
    assert config == original
    for version in ("1", "2"):
        assert (rendered / "deterioration" / version / "model.py").is_file()
    assert (rendered / "deterioration" / "2" / "weights.json").is_file()


def test_render_without_gpus_keeps_cpu(tmp_path: Path) -> None:
    """gpu_count=0: the configuration is copied byte for byte (KIND_CPU)."""
    rendered = render_model_repository(REPOSITORY, tmp_path / "rendered", gpu_count=0)
    text = (rendered / "deterioration" / "config.pbtxt").read_text()
    assert text == (MODEL_DIR / "config.pbtxt").read_text()
    kinds = [g.kind for g in parse(text).instance_group]
    assert kinds == [model_config_pb2.ModelInstanceGroup.KIND_CPU]
    assert repository_models(rendered) == {"deterioration": [1, 2], "ecg-rhythm": [1]}


def test_render_refuses_a_non_empty_destination(tmp_path: Path) -> None:
    """Rendering into a folder that already holds files raises FileExistsError."""
    (tmp_path / "x").write_text("keep me")
    with pytest.raises(FileExistsError):
        render_model_repository(REPOSITORY, tmp_path, gpu_count=0)


def test_render_config_handles_repeated_groups_comments_and_absence() -> None:
    """Repeated instance_group entries become one GPU block; comments and strings are ignored."""
    text = (
        '# instance_group [ { kind: KIND_CPU } ] in a comment\nname: "m" '
        'backend: "python"\nparameters { key: "note" value: { string_value: "instance_group" } }\n'
        "instance_group { kind: KIND_CPU count: 2 }\ninstance_group: { kind: KIND_CPU }\n"
    )
    config = parse(render_config(text, 1))
    assert [(g.kind, list(g.gpus)) for g in config.instance_group] == [
        (model_config_pb2.ModelInstanceGroup.KIND_GPU, [0])
    ]
    assert config.parameters["note"].string_value == "instance_group"
    assert render_config(text, 1).startswith("# instance_group [ { kind: KIND_CPU } ]")
    appended = parse(render_config('name: "m" backend: "python"', 2))
    assert [list(g.gpus) for g in appended.instance_group] == [[0], [1]]


def test_served_versions_follow_the_version_policy(tmp_path: Path) -> None:
    """Without a policy Triton serves the latest version only; 'specific' serves those listed."""
    for version in ("1", "2", "3"):
        (tmp_path / version).mkdir()
    (tmp_path / "config.pbtxt").write_text('name: "m"\n')
    assert served_versions(tmp_path) == [3]
    (tmp_path / "config.pbtxt").write_text("version_policy: { latest { num_versions: 2 } }\n")
    assert served_versions(tmp_path) == [2, 3]
    (tmp_path / "config.pbtxt").write_text("version_policy: { specific { versions: [1, 3] } }\n")
    assert served_versions(tmp_path) == [1, 3]


def test_backend_directory_is_assembled_outside_site_packages(tmp_path: Path) -> None:
    """The python backend and the stub for this Python are copied to the cache, then reused."""
    backends = prepare_backend_directory(tmp_path / "cache")
    python = backends / "python"
    assert (python / "libtriton_python.so").is_file()
    stub = python / "triton_python_backend_stub"
    assert stub.is_file()
    assert os.access(stub, os.X_OK)
    assert tmp_path in backends.parents
    assert prepare_backend_directory(tmp_path / "cache") == backends


def test_environment_puts_this_python_first() -> None:
    """LD_LIBRARY_PATH starts with this interpreter's LIBDIR; PATH with this environment's bin."""
    env = triton_environment({"PATH": "/usr/bin", "LD_LIBRARY_PATH": "/opt/x"})
    libdirs = env["LD_LIBRARY_PATH"].split(os.pathsep)
    assert libdirs[0] == sysconfig.get_config_var("LIBDIR")
    assert libdirs[-1] == "/opt/x"
    assert any(d.endswith("nvidia_pytriton.libs") for d in libdirs)
    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.prefix) / "bin")


def test_start_refuses_busy_ports_before_starting_anything(tmp_path: Path) -> None:
    """A port already listened on makes start() raise (Triton itself would share it silently)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        busy = holder.getsockname()[1]
        assert port_in_use("127.0.0.1", busy)
        server = TritonServer(
            REPOSITORY,
            ports=TritonPorts(http=busy, grpc=busy + 1, metrics=busy + 2),
            work_dir=tmp_path / "work",
            backend_cache_dir=tmp_path / "cache",
        )
        with pytest.raises(RuntimeError, match="already in use"):
            server.start()
    assert not server.is_running()
    assert not (tmp_path / "work").exists()
