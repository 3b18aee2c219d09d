"""The Triton model repository (deploy/triton/models) and the launcher's repository helpers.

config.pbtxt is parsed with Triton's own ModelConfig protobuf (shipped in tritonclient), so a
typo that Triton would reject fails here. Rendering (medmesh_cli.devstack.model_repository) is
checked on the committed repository and on tiny ONNX models built by tests/onnx_models.py.
Nothing in this file starts Triton (tests/e2e/test_triton_onnx.py does).
"""

from __future__ import annotations

import ast
import importlib
import os
import shutil
import socket
import sys
import sysconfig
from pathlib import Path
from typing import Any

import pytest

from medmesh_cli.devstack import model_repository, onnx_runner
from medmesh_cli.devstack.model_repository import render_model
from medmesh_cli.devstack.onnx_runner import ONNX_FILE_PARAMETER
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
from medmesh_contracts.modelspec import ModelSpec, VersionSpec, load_specs
from tests.onnx_models import add_version, onnx_model_folder

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


DATATYPES = {
    "FP16": "TYPE_FP16",
    "FP32": "TYPE_FP32",
    "FP64": "TYPE_FP64",
    "INT8": "TYPE_INT8",
    "INT16": "TYPE_INT16",
    "INT32": "TYPE_INT32",
    "INT64": "TYPE_INT64",
    "UINT8": "TYPE_UINT8",
    "UINT16": "TYPE_UINT16",
    "UINT32": "TYPE_UINT32",
    "BOOL": "TYPE_BOOL",
}
SPEC_VERSIONS = [(spec, version) for spec in SPECS.values() for version in spec.versions]


def triton_type(datatype: str) -> int:
    """The ModelConfig data_type of a spec datatype (KServe name)."""
    value: int = getattr(model_config_pb2, DATATYPES[datatype])
    return value


@pytest.fixture(
    scope="module", params=SPEC_VERSIONS, ids=[f"{s.name}-v{v.version}" for s, v in SPEC_VERSIONS]
)
def spec_version(request: pytest.FixtureRequest) -> tuple[ModelSpec, VersionSpec]:
    """Each deployed model version's spec (deploy/models/*.yaml)."""
    spec, version = request.param
    return spec, version


def test_config_tensors_agree_with_the_model_spec(
    spec_version: tuple[ModelSpec, VersionSpec],
) -> None:
    """Model name, batch size, tensor names, types and dims of the Triton model serving a spec
    version match the tensors the spec declares; the model is a python or an ONNX model."""
    _, version = spec_version
    triton = version.triton
    config = parse((REPOSITORY / triton.model / "config.pbtxt").read_text())
    assert config.name == triton.model
    assert (config.backend, config.platform) in {("python", ""), ("", "onnxruntime_onnx")}
    assert config.max_batch_size == triton.max_batch_size
    inputs = {t.name: (t.data_type, list(t.dims)) for t in config.input}
    assert inputs == {t.name: (triton_type(t.datatype), list(t.shape)) for t in triton.inputs}
    outputs = {t.name: (t.data_type, list(t.dims)) for t in config.output}
    assert outputs == {t.name: (triton_type(t.datatype), list(t.shape)) for t in triton.outputs}


def test_config_serves_every_spec_version_on_cpu(
    spec_version: tuple[ModelSpec, VersionSpec],
) -> None:
    """All versions are served, each spec version has a folder (model.py or model.onnx),
    batching is dynamic, on CPU."""
    spec, version = spec_version
    model = version.triton.model
    model_dir = REPOSITORY / model
    config = parse((model_dir / "config.pbtxt").read_text())
    assert config.version_policy.WhichOneof("policy_choice") == "all"
    wanted = sorted(v.triton.version for v in spec.versions if v.triton.model == model)
    assert served_versions(model_dir) == wanted
    model_file = "model.onnx" if config.platform == "onnxruntime_onnx" else "model.py"
    assert (model_dir / str(version.triton.version) / model_file).is_file()
    assert config.dynamic_batching.max_queue_delay_microseconds == 2000
    assert [(g.kind, g.count) for g in config.instance_group] == [
        (model_config_pb2.ModelInstanceGroup.KIND_CPU, 1)
    ]


def test_bands_of_the_models_are_the_spec_bands() -> None:
    """The specs declare exactly the band values the models emit: deterioration 0-3 (RISK_BAND),
    ecg-rhythm 0-2 (RHYTHM_BAND: regular, irregular, unreadable); chest-opacity reports findings,
    no band."""
    bands = {
        name: sorted({b.index for v in spec.versions for b in getattr(v.headline, "bands", ())})
        for name, spec in SPECS.items()
    }
    assert bands == {"deterioration": [0, 1, 2, 3], "ecg-rhythm": [0, 1, 2], "chest-opacity": []}


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
    for model in repository_models(rendered):
        kinds = [
            g.kind for g in parse((rendered / model / "config.pbtxt").read_text()).instance_group
        ]
        assert kinds == [gpu, gpu], model


def test_render_without_gpus_keeps_cpu(tmp_path: Path) -> None:
    """gpu_count=0: a python model's configuration is copied byte for byte (KIND_CPU), and every
    model of the repository is there with the versions it serves."""
    rendered = render_model_repository(REPOSITORY, tmp_path / "rendered", gpu_count=0)
    for model in ("deterioration", "ecg-rhythm"):
        text = (rendered / model / "config.pbtxt").read_text()
        assert text == (REPOSITORY / model / "config.pbtxt").read_text()
        kinds = [g.kind for g in parse(text).instance_group]
        assert kinds == [model_config_pb2.ModelInstanceGroup.KIND_CPU]
    models = repository_models(rendered)
    assert models == repository_models(REPOSITORY)
    assert models["deterioration"] == [1, 2]
    assert models["ecg-rhythm"] == [1]


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


def test_render_config_refuses_what_triton_would_refuse() -> None:
    """A config.pbtxt Triton cannot parse (a misspelt field) fails rendering with ParseError."""
    with pytest.raises(text_format.ParseError, match="instance_grup"):
        render_config('name: "m"\ninstance_grup { kind: KIND_CPU }\n', 1)


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
    (tmp_path / "config.pbtxt").write_text("version_policy: { latest {} }\n")
    assert served_versions(tmp_path) == [3]
    (tmp_path / "config.pbtxt").write_text("version_policy: { all {} }\n")
    assert served_versions(tmp_path) == [1, 2, 3]


# --- ONNX models: the python-backend runner for the local tritonserver --------------------------


def onnx_source(tmp_path: Path) -> Path:
    """A source repository with one python model (deterioration) and one ONNX model, 2 versions."""
    source = tmp_path / "source"
    shutil.copytree(MODEL_DIR, source / "deterioration")
    onnx_model_folder(source, "classifier", versions=(1, 2))
    return source


@pytest.mark.parametrize("gpu_count", [0, 2])
def test_rendered_onnx_config_declares_what_the_native_one_declares(
    tmp_path: Path, gpu_count: int
) -> None:
    """The runner's config has the native config's name, max_batch_size, inputs and outputs
    (names, datatypes, dims), version policy, batching and instance groups; backend python."""
    source = onnx_source(tmp_path)
    rendered = render_model_repository(source, tmp_path / "rendered", gpu_count)
    native = parse((source / "classifier" / "config.pbtxt").read_text())
    runner = parse((rendered / "classifier" / "config.pbtxt").read_text())
    assert (native.platform, native.backend) == ("onnxruntime_onnx", "")
    assert (runner.platform, runner.backend) == ("", "python")
    assert runner.name == native.name == "classifier"
    assert runner.max_batch_size == native.max_batch_size == 8
    assert list(runner.input) == list(native.input)
    assert list(runner.output) == list(native.output)
    assert [(t.name, t.data_type, list(t.dims)) for t in runner.output] == [
        ("LOGITS", model_config_pb2.TYPE_FP32, [3]),
        ("PROBS", model_config_pb2.TYPE_FP32, [3]),
        ("CLASS", model_config_pb2.TYPE_INT64, [1]),
    ]
    assert runner.version_policy == native.version_policy
    assert runner.dynamic_batching == native.dynamic_batching
    assert runner.HasField("dynamic_batching")
    if gpu_count:
        gpu = model_config_pb2.ModelInstanceGroup.KIND_GPU
        assert [(g.kind, list(g.gpus)) for g in runner.instance_group] == [(gpu, [0]), (gpu, [1])]
    else:
        assert list(runner.instance_group) == list(native.instance_group)
    assert runner.parameters[ONNX_FILE_PARAMETER].string_value == "model.onnx"
    assert repository_models(rendered) == {"classifier": [1, 2], "deterioration": [1, 2]}


def test_rendered_onnx_versions_hold_the_model_and_the_runner(tmp_path: Path) -> None:
    """Every version folder keeps its model.onnx and gets model.py = the cli's onnx_runner."""
    source = onnx_source(tmp_path)
    rendered = render_model_repository(source, tmp_path / "rendered", 0)
    runner = Path(onnx_runner.__file__).read_bytes()
    for version in ("1", "2"):
        folder = rendered / "classifier" / version
        assert (folder / "model.py").read_bytes() == runner
        onnx_file = (source / "classifier" / version / "model.onnx").read_bytes()
        assert (folder / "model.onnx").read_bytes() == onnx_file
    assert sorted(p.name for p in (rendered / "classifier" / "1").iterdir()) == [
        "model.onnx",
        "model.py",
    ]
    assert (rendered / "deterioration" / "config.pbtxt").read_text() == (
        MODEL_DIR / "config.pbtxt"
    ).read_text()


def test_native_rendering_keeps_onnx_models_for_nvidias_container(tmp_path: Path) -> None:
    """onnx_runner=False (NVIDIA's container loads ONNX itself): platform onnxruntime_onnx and
    the version folders stay; with GPUs only the instance groups change."""
    source = onnx_source(tmp_path)
    rendered = render_model_repository(source, tmp_path / "rendered", 1, onnx_runner=False)
    config = parse((rendered / "classifier" / "config.pbtxt").read_text())
    assert (config.platform, config.backend) == ("onnxruntime_onnx", "")
    assert [(g.kind, list(g.gpus)) for g in config.instance_group] == [
        (model_config_pb2.ModelInstanceGroup.KIND_GPU, [0])
    ]
    assert not (rendered / "classifier" / "1" / "model.py").exists()
    original = parse((source / "classifier" / "config.pbtxt").read_text())
    del config.instance_group[:]
    del original.instance_group[:]
    assert config == original


def test_onnx_file_name_and_backend_form_are_carried_over(tmp_path: Path) -> None:
    """backend "onnxruntime" is ONNX too; default_model_filename becomes the runner's parameter
    (the python backend would read it as its script); onnxruntime accelerators are dropped."""
    source = tmp_path / "source"
    folder = onnx_model_folder(source, "net")
    (folder / "1" / "model.onnx").rename(folder / "1" / "net.onnx")
    text = (
        (folder / "config.pbtxt")
        .read_text()
        .replace(
            'platform: "onnxruntime_onnx"',
            'backend: "onnxruntime"\ndefault_model_filename: "net.onnx"\n'
            "optimization { execution_accelerators { gpu_execution_accelerator "
            '{ name: "tensorrt" } } }',
        )
    )
    (folder / "config.pbtxt").write_text(text)
    rendered = render_model_repository(source, tmp_path / "rendered", 0)
    config = parse((rendered / "net" / "config.pbtxt").read_text())
    assert config.backend == "python"
    assert config.default_model_filename == ""
    assert not config.HasField("optimization")
    assert config.parameters[ONNX_FILE_PARAMETER].string_value == "net.onnx"
    assert (rendered / "net" / "1" / "model.py").is_file()


def test_an_onnx_config_without_tensors_cannot_be_rendered(tmp_path: Path) -> None:
    """The runner's config needs the inputs and outputs declared: ValueError naming the model."""
    folder = onnx_model_folder(tmp_path / "source", "bare")
    (folder / "config.pbtxt").write_text('name: "bare"\nplatform: "onnxruntime_onnx"\n')
    with pytest.raises(ValueError, match=r"bare.*inputs and outputs"):
        render_model_repository(tmp_path / "source", tmp_path / "rendered", 0)


def test_an_onnx_version_without_its_file_cannot_be_rendered(tmp_path: Path) -> None:
    """A version folder of an ONNX model without model.onnx fails rendering, naming the folder."""
    folder = onnx_model_folder(tmp_path / "source", "classifier", versions=(1,))
    (folder / "2").mkdir()
    with pytest.raises(ValueError, match=r"2 has no model\.onnx"):
        render_model_repository(tmp_path / "source", tmp_path / "rendered", 0)


# --- one model at a time (explicit model control) -----------------------------------------------


def test_render_model_adds_a_model_and_replaces_one_with_a_new_version(tmp_path: Path) -> None:
    """render_model writes one model folder into a rendered repository, and rendering it again
    after a new version folder replaces it whole; other models and no staging folder remain."""
    source = onnx_source(tmp_path)
    served = render_model_repository(source, tmp_path / "served", 0)
    new = onnx_model_folder(source, "newcomer", versions=(1,))
    assert render_model(new, served, 0) == served / "newcomer"
    assert repository_models(served)["newcomer"] == [1]
    add_version(new, 2)
    render_model(new, served, 0)
    assert repository_models(served) == {
        "classifier": [1, 2],
        "deterioration": [1, 2],
        "newcomer": [1, 2],
    }
    assert (served / "newcomer" / "2" / "model.py").is_file()
    assert sorted(p.name for p in served.iterdir()) == ["classifier", "deterioration", "newcomer"]


def test_render_model_refuses_a_folder_without_config(tmp_path: Path) -> None:
    """A folder without config.pbtxt is not a model: ValueError, nothing written."""
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"no config\.pbtxt"):
        render_model(tmp_path / "empty", tmp_path / "served", 0)
    assert not (tmp_path / "served").exists()


def test_sync_command_renders_every_model_and_drops_removed_ones(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The render command (compose job, models image) renders each model for the GPUs asked
    for, replaces what the target holds, and removes models no longer in the source."""
    source = onnx_source(tmp_path)
    target = tmp_path / "target"
    onnx_model_folder(target, "retired")
    args = ["--source", str(source), "--target", str(target), "--gpus", "2", "--onnx", "native"]
    assert model_repository.main(args) == 0
    assert sorted(repository_models(target)) == ["classifier", "deterioration"]
    gpu = model_config_pb2.ModelInstanceGroup.KIND_GPU
    for model in ("classifier", "deterioration"):
        config = parse((target / model / "config.pbtxt").read_text())
        assert [(g.kind, list(g.gpus)) for g in config.instance_group] == [(gpu, [0]), (gpu, [1])]
    assert parse((target / "classifier" / "config.pbtxt").read_text()).platform == (
        "onnxruntime_onnx"
    )
    assert "rendered classifier (versions [1, 2]" in capsys.readouterr().out


def test_sync_command_counts_gpus_itself_when_asked_auto(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--gpus auto uses the launcher's GPU detection (MEDMESH_GPU_COUNT first); --onnx runner
    renders the python-backend runner."""
    monkeypatch.setenv("MEDMESH_GPU_COUNT", "1")
    source = onnx_source(tmp_path)
    target = tmp_path / "target"
    model_repository.main(["--source", str(source), "--target", str(target), "--onnx", "runner"])
    config = parse((target / "classifier" / "config.pbtxt").read_text())
    assert config.backend == "python"
    assert [list(g.gpus) for g in config.instance_group] == [[0]]


def test_server_command_loads_every_model_under_explicit_control(tmp_path: Path) -> None:
    """tritonserver starts with explicit model control and loads all models at start."""
    server = TritonServer(REPOSITORY, work_dir=tmp_path / "work")
    command = server.command(tmp_path / "repo", tmp_path / "backends")
    assert "--model-control-mode=explicit" in command
    assert "--load-model=*" in command
    assert f"--model-repository={tmp_path / 'repo'}" in command


def test_models_cannot_be_loaded_before_the_server_started(tmp_path: Path) -> None:
    """render_model, load_model and unload_model of a server not started raise RuntimeError."""
    server = TritonServer(REPOSITORY, work_dir=tmp_path / "work")
    with pytest.raises(RuntimeError, match="not called"):
        server.render_model("deterioration")
    with pytest.raises(RuntimeError, match="not running"):
        server.load_model("deterioration")
    with pytest.raises(RuntimeError, match="not running"):
        server.unload_model("deterioration")


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
