"""Model-owner tooling: `medmesh models validate`, `new` and `migrate`, and `deploy`'s offline check
(medmesh_cli.modelkit). The ONNX models are tiny graphs built here with onnx.helper."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import onnx
import pytest
import yaml
from google.protobuf import text_format
from onnx import TensorProto, helper
from tritonclient.grpc import model_config_pb2
from typer.testing import CliRunner

from medmesh_cli import modelkit
from medmesh_cli.devstack.model_repository import parse_config
from medmesh_cli.main import app
from medmesh_cli.models import offline_check
from medmesh_contracts.modelspec import load_spec, parse_spec
from medmesh_contracts.modelspec_v1 import upgrade

ROOT = Path(__file__).resolve().parents[2]
SPECS = ROOT / "deploy" / "models"
REPOSITORY = ROOT / "deploy" / "triton" / "models"
SHOCK_INDEX = ROOT / "tests" / "fixtures" / "models" / "specs" / "shock-index.yaml"
MODEL = "tiny"

Dims = Sequence[int | str]


def tiny_onnx(
    path: Path,
    *,
    input_type: int = TensorProto.FLOAT,
    input_dims: Dims = ("batch", 3),
    probabilities_type: int = TensorProto.FLOAT,
    probabilities_dims: Dims = ("batch", 2),
) -> Path:
    """A tiny ONNX model: X (3 features) -> P (2 class probabilities) and Y (1 value)."""
    weights = helper.make_tensor("W", TensorProto.FLOAT, [3, 2], [0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    column = helper.make_tensor("V", TensorProto.FLOAT, [3, 1], [1.0, 2.0, 3.0])
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["X", "W"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["P"], axis=1),
            helper.make_node("MatMul", ["X", "V"], ["Y"]),
        ],
        "tiny",
        [helper.make_tensor_value_info("X", input_type, list(input_dims))],
        [
            helper.make_tensor_value_info("P", probabilities_type, list(probabilities_dims)),
            helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["batch", 1]),
        ],
        initializer=[weights, column],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def fill_placeholders(document: Any, key: str = "") -> Any:
    """What a model owner does to a scaffolded spec: every TODO text replaced by a real one."""
    if isinstance(document, dict):
        return {k: fill_placeholders(v, str(k)) for k, v in document.items()}
    if isinstance(document, list):
        return [fill_placeholders(v, key) for v in document]
    if isinstance(document, str) and modelkit.PLACEHOLDER in document:
        return {"code": "12345-6", "unit": "1"}.get(key, f"the owner's {key}")
    return document


def invoke(*arguments: str | Path) -> Any:
    """Run `medmesh ...` in-process."""
    return CliRunner().invoke(app, [str(a) for a in arguments])


class OwnerModel:
    """A scaffolded, completed model in tmp_path: its spec file and Triton repository."""

    def __init__(self, root: Path) -> None:
        self.repository = root / "models"
        self.specs = root / "specs"
        self.spec_file = self.specs / f"{MODEL}.yaml"
        self.folder = self.repository / MODEL
        self.onnx_file = self.folder / "1" / "model.onnx"
        self.config_file = self.folder / "config.pbtxt"

    def document(self) -> dict[str, Any]:
        """The spec as YAML data."""
        data: dict[str, Any] = yaml.safe_load(self.spec_file.read_text())
        return data

    def edit_spec(self, change: Callable[[dict[str, Any]], None]) -> None:
        """Change the spec document in place."""
        document = self.document()
        change(document)
        self.spec_file.write_text(yaml.safe_dump(document, sort_keys=False))

    def edit_config(self, change: Callable[[Any], None]) -> None:
        """Change config.pbtxt (as Triton's ModelConfig)."""
        config = parse_config(self.config_file.read_text())
        change(config)
        self.config_file.write_text(text_format.MessageToString(config))

    def problems(self) -> list[str]:
        """What validate finds."""
        spec = load_spec(self.spec_file)
        return modelkit.validate_spec_against_repository(
            spec, self.repository, source=str(self.spec_file)
        )


@pytest.fixture
def owner(tmp_path: Path) -> OwnerModel:
    """`medmesh models new` from a tiny ONNX model, placeholders then completed by the owner."""
    model = OwnerModel(tmp_path)
    source = tiny_onnx(tmp_path / "export" / "tiny.onnx")
    scaffold = modelkit.scaffold(MODEL, modelkit.read_graph(source))
    model.folder.joinpath("1").mkdir(parents=True)
    shutil.copyfile(source, model.onnx_file)
    model.config_file.write_text(scaffold.config_text)
    model.specs.mkdir()
    model.spec_file.write_text(
        yaml.safe_dump(fill_placeholders(yaml.safe_load(scaffold.spec_text)))
    )
    assert model.problems() == []
    return model


def _vx(document: dict[str, Any]) -> dict[str, Any]:
    """The X input tensor of version 1."""
    tensor: dict[str, Any] = document["versions"][0]["triton"]["inputs"][0]
    return tensor


# --- validate: committed specs --------------------------------------------------------------------


@pytest.mark.parametrize("spec_file", sorted(SPECS.glob("*.yaml")), ids=lambda p: p.name)
def test_committed_specs_agree_with_the_committed_repository(spec_file: Path) -> None:
    """Every version of deploy/models/*.yaml agrees with deploy/triton/models (config, ONNX)."""
    spec = load_spec(spec_file)
    check = modelkit.check_spec(spec, REPOSITORY, source=str(spec_file))
    assert check.all_problems == []
    assert [v.version for v in check.versions] == [v.version for v in spec.versions]


def test_validate_command_prints_one_ok_line_per_version() -> None:
    """`medmesh models validate deploy/models/deterioration.yaml` exits 0, one OK per version."""
    spec_file = SPECS / "deterioration.yaml"
    result = invoke("models", "validate", spec_file, "--repository", REPOSITORY)
    assert result.exit_code == 0, result.output
    ok = [line for line in result.output.splitlines() if line.startswith("OK ")]
    assert len(ok) == len(load_spec(spec_file).versions)
    assert "version 1: Triton deterioration v1 (python backend" in ok[0]


# --- validate: what it rejects ---------------------------------------------------------------------


def test_dtype_mismatch_between_spec_and_config_is_reported(owner: OwnerModel) -> None:
    """An output declared INT64 in the spec but TYPE_FP32 in config.pbtxt names both fixes."""
    owner.edit_spec(lambda d: d["versions"][0]["triton"]["outputs"][1].update(datatype="INT64"))
    problems = owner.problems()
    assert any(
        "output tensor Y is INT64 in the spec but FP32 in" in p
        and "config.pbtxt" in p
        and "set datatype: FP32 in the spec or data_type: TYPE_INT64" in p
        for p in problems
    ), problems


def test_dtype_mismatch_between_spec_and_onnx_is_reported(owner: OwnerModel) -> None:
    """An input FP16 in spec and config but float in model.onnx: the ONNX type and the fix."""
    owner.edit_spec(lambda d: _vx(d).update(datatype="FP16"))
    owner.edit_config(lambda c: setattr(c.input[0], "data_type", model_config_pb2.TYPE_FP16))
    problems = owner.problems()
    assert len(problems) == 1, problems
    assert problems[0] == (
        f"{owner.spec_file} version 1: input tensor X is FP16 in the spec but FP32 in"
        f" {owner.onnx_file} (float); set datatype: FP32 in the spec (and data_type: TYPE_FP32"
        f" in {owner.config_file}) or re-export the model"
    )


def test_shape_mismatch_between_spec_and_config_is_reported(owner: OwnerModel) -> None:
    """Config dims [4] against the spec's [3] name both files and the shapes."""

    def widen(config: Any) -> None:
        del config.input[0].dims[:]
        config.input[0].dims.append(4)

    owner.edit_config(widen)
    problems = owner.problems()
    assert any(
        "input tensor X has shape [3] in the spec but dims [4] in" in p and "config.pbtxt" in p
        for p in problems
    ), problems


def test_shape_mismatch_between_spec_and_onnx_is_reported(owner: OwnerModel) -> None:
    """A graph output [batch, 3] against the spec's [2]: the ONNX shape and the expected one."""
    tiny_onnx(owner.onnx_file, probabilities_dims=("batch", 3))
    problems = owner.problems()
    assert any(
        "output tensor P has shape [batch, 3] in" in p
        and "model.onnx" in p
        and "declares [2], i.e. [batch, 2] with the batch dimension" in p
        for p in problems
    ), problems


def test_a_fixed_onnx_batch_dimension_is_reported(owner: OwnerModel) -> None:
    """A graph input [1, 3] cannot be batched: re-export with a dynamic first axis."""
    tiny_onnx(owner.onnx_file, input_dims=(1, 3))
    problems = owner.problems()
    assert any("batch dimension (the first) fixed at 1" in p for p in problems), problems


@pytest.mark.parametrize(
    ("role", "elem_type", "expected"),
    [
        ("input", TensorProto.INT64, "input tensor X is INT64 (int64), which medmesh cannot feed"),
        ("input", TensorProto.STRING, "input tensor X is BYTES (string), which medmesh cannot"),
        ("output", TensorProto.COMPLEX64, "output tensor P is complex64, which Triton cannot"),
        ("output", TensorProto.UINT64, "output tensor P is UINT64 (uint64), which medmesh cannot"),
    ],
)
def test_unsupported_onnx_types_are_reported(
    owner: OwnerModel, role: str, elem_type: int, expected: str
) -> None:
    """ONNX element types Triton or medmesh cannot use are reported as unsupported."""
    if role == "input":
        tiny_onnx(owner.onnx_file, input_type=elem_type)
    else:
        tiny_onnx(owner.onnx_file, probabilities_type=elem_type)
    problems = owner.problems()
    assert any(expected in p and "unsupported" in p for p in problems), problems


def test_a_missing_version_folder_is_reported(owner: OwnerModel) -> None:
    """triton.version 2 without a folder 2/: the folder, the versions there, what to do."""
    owner.edit_spec(lambda d: d["versions"][0]["triton"].update(version=2))
    problems = owner.problems()
    assert any(
        f"the version folder {owner.folder / '2'} does not exist (versions there: [1])" in p
        for p in problems
    ), problems


def test_unbatched_configs_and_unknown_platforms_are_reported(owner: OwnerModel) -> None:
    """max_batch_size 0 and a platform medmesh does not serve are both named, with the fix."""

    def unbatched(config: Any) -> None:
        config.max_batch_size = 0
        config.platform = "tensorrt_plan"

    owner.edit_config(unbatched)
    problems = owner.problems()
    assert any("has max_batch_size 0" in p for p in problems), problems
    assert any('declares platform "tensorrt_plan", which medmesh does not' in p for p in problems)


def test_validate_command_exits_1_listing_problems(owner: OwnerModel) -> None:
    """`medmesh models validate` exits 1 and prints each problem and their count."""
    shutil.rmtree(owner.folder / "1")
    result = invoke("models", "validate", owner.spec_file, "--repository", owner.repository)
    assert result.exit_code == 1
    assert "does not exist (versions there: [])" in result.output
    assert "problem(s) in" in result.output


# --- deploy's offline check ------------------------------------------------------------------------


def test_deploy_stops_on_an_offline_problem_before_kafka(owner: OwnerModel) -> None:
    """`deploy` runs the offline check first: a mismatch exits 1 before Triton and Kafka."""
    tiny_onnx(owner.onnx_file, probabilities_dims=("batch", 3))
    result = invoke(
        "models",
        "deploy",
        owner.spec_file,
        "--version",
        "1",
        "--repository",
        owner.repository,
        "--bootstrap",
        "127.0.0.1:1",
    )
    assert result.exit_code == 1
    assert "offline check:" in result.output
    assert "output tensor P has shape [batch, 3]" in result.output


def test_deploy_skips_the_offline_check_without_a_model_folder(
    owner: OwnerModel, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """No folder for the Triton model in the repository: the check is skipped, saying so."""
    spec = load_spec(owner.spec_file)
    offline_check(spec, owner.spec_file, 1, tmp_path / "elsewhere")
    assert "offline check skipped: no Triton model folder for tiny" in capsys.readouterr().out


def test_the_default_repository_follows_an_overlay_layout(tmp_path: Path) -> None:
    """A spec in <x>/specs/ beside <x>/models/ is checked there; otherwise the checkout's."""
    (tmp_path / "overlay" / "specs").mkdir(parents=True)
    (tmp_path / "overlay" / "models").mkdir()
    overlay = tmp_path / "overlay" / "specs" / "m.yaml"
    assert modelkit.default_repository(overlay, ROOT) == tmp_path / "overlay" / "models"
    assert modelkit.default_repository(SPECS / "ecg-rhythm.yaml", ROOT) == REPOSITORY


# --- new -------------------------------------------------------------------------------------------


def test_scaffold_round_trip(tmp_path: Path) -> None:
    """`new` scaffolds config, model and spec; validate names the TODOs, passes once filled."""
    model = OwnerModel(tmp_path)
    source = tiny_onnx(tmp_path / "export" / "tiny.onnx")
    result = invoke(
        "models",
        "new",
        MODEL,
        "--onnx",
        source,
        "--repository",
        model.repository,
        "--specs",
        model.specs,
        "--max-batch-size",
        "32",
    )
    assert result.exit_code == 0, result.output
    assert "TODO placeholders" in result.output

    config = parse_config(model.config_file.read_text())
    assert (config.name, config.platform, config.max_batch_size) == (MODEL, "onnxruntime_onnx", 32)
    assert [(t.name, t.data_type, list(t.dims)) for t in config.input] == [
        ("X", model_config_pb2.TYPE_FP32, [3])
    ]
    assert [(t.name, list(t.dims)) for t in config.output] == [("P", [2]), ("Y", [1])]
    assert config.version_policy.WhichOneof("policy_choice") == "all"
    assert config.HasField("dynamic_batching")
    assert [(g.kind, g.count) for g in config.instance_group] == [
        (model_config_pb2.ModelInstanceGroup.KIND_CPU, 1)
    ]
    assert model.onnx_file.read_bytes() == source.read_bytes()

    spec = load_spec(model.spec_file)
    version = spec.version(1)
    assert [i.name for i in spec.inputs] == ["X_0", "X_1", "X_2"]
    assert version.triton.inputs[0].feed == "features"
    assert version.triton.inputs[0].inputs == ("X_0", "X_1", "X_2")
    assert [o.kind for o in version.outputs] == ["classification", "quantity"]
    assert spec.routing.weights == {1: 100}

    pending = invoke("models", "validate", model.spec_file, "--repository", model.repository)
    assert pending.exit_code == 1
    assert "inputs[X_0].unit is still a placeholder ('TODO')" in pending.output
    assert "inputs[X_0].sources[0].code.code is still a placeholder" in pending.output
    assert "versions[version=1].outputs[0].classes[1].code.code" in pending.output
    assert "OK " not in pending.output

    model.spec_file.write_text(yaml.safe_dump(fill_placeholders(model.document())))
    done = invoke("models", "validate", model.spec_file, "--repository", model.repository)
    assert done.exit_code == 0, done.output
    assert done.output.startswith(f"OK {model.spec_file} version 1: Triton tiny v1 (ONNX")

    again = invoke(
        "models",
        "new",
        MODEL,
        "--onnx",
        source,
        "--repository",
        model.repository,
        "--specs",
        model.specs,
    )
    assert again.exit_code == 1
    assert "refusing to overwrite" in again.output


def test_new_refuses_an_unservable_graph(tmp_path: Path) -> None:
    """A graph with a string input or a fixed batch dimension is refused, nothing written."""
    source = tiny_onnx(tmp_path / "s.onnx", input_type=TensorProto.STRING, input_dims=(1, 3))
    with pytest.raises(modelkit.ScaffoldError) as refused:
        modelkit.scaffold(MODEL, modelkit.read_graph(source))
    assert "input X of model.onnx is BYTES (string)" in str(refused.value)
    result = invoke(
        "models",
        "new",
        MODEL,
        "--onnx",
        source,
        "--repository",
        tmp_path / "r",
        "--specs",
        tmp_path / "s",
    )
    assert result.exit_code == 1
    assert not (tmp_path / "r").exists()


def test_new_feeds_a_waveform_tensor_from_one_signal_input(tmp_path: Path) -> None:
    """--waveform X: one waveform input of X's width instead of one input per value."""
    source = tiny_onnx(tmp_path / "w.onnx")
    scaffold = modelkit.scaffold(MODEL, modelkit.read_graph(source), waveforms=["X"])
    tensor = scaffold.spec.version(1).triton.inputs[0]
    assert (tensor.feed, tensor.inputs) == ("waveform", ("X_0",))
    signal = scaffold.spec.input("X_0").waveform
    assert signal is not None
    assert signal.samples == 3


# --- migrate ---------------------------------------------------------------------------------------


def test_migrated_shock_index_loads_as_the_same_spec() -> None:
    """The v2 document of the v1 shock-index spec loads to the spec the v1 file upgrades to."""
    original = SHOCK_INDEX.read_text()
    migrated = modelkit.migrated_text(original, str(SHOCK_INDEX))
    document = yaml.safe_load(migrated)
    assert document["schema"] == "medmesh.ModelSpec/2"
    assert list(document)[:4] == ["schema", "name", "display", "owner"]
    assert parse_spec(document) == upgrade(yaml.safe_load(original))
    assert parse_spec(document) == load_spec(SHOCK_INDEX)


def test_migrate_command_prints_writes_and_refuses_v2(tmp_path: Path) -> None:
    """`migrate` prints the v2 YAML, --write rewrites the file, and a v2 spec is refused."""
    printed = invoke("models", "migrate", SHOCK_INDEX)
    assert printed.exit_code == 0, printed.output
    assert parse_spec(yaml.safe_load(printed.output)) == load_spec(SHOCK_INDEX)

    copy = tmp_path / "shock-index.yaml"
    shutil.copyfile(SHOCK_INDEX, copy)
    written = invoke("models", "migrate", copy, "--write")
    assert written.exit_code == 0, written.output
    assert yaml.safe_load(copy.read_text())["schema"] == "medmesh.ModelSpec/2"
    assert load_spec(copy) == load_spec(SHOCK_INDEX)

    refused = invoke("models", "migrate", copy)
    assert refused.exit_code == 1
    assert f"{copy} is already a medmesh.ModelSpec/2 spec: nothing to migrate" in refused.output
