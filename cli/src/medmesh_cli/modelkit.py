"""Model-owner tooling, offline: check a model spec against its Triton model folders and ONNX
graphs, scaffold a new model from an ONNX file, and migrate version 1 specs to version 2.

Nothing here talks to Kafka or Triton or writes a file: functions read the files they are given
and return problems or file texts; ``medmesh_cli.models`` (``medmesh models validate|new|migrate``
and ``deploy``) prints and writes.

- ``check_spec`` / ``validate_spec_against_repository``: the spec's own checks
  (``version_problems``), placeholders left by ``new`` (``TODO``), and for each version its
  Triton folder (``<repository>/<triton.model>/config.pbtxt``, read as Triton's ``ModelConfig``
  with protobuf's text_format) and, for an ONNX version, the graph of its ``model.onnx``: tensor
  names, datatypes and shapes, batching, platform/backend, version folder, and element types
  Triton or medmesh cannot use. Every problem says in which file and what to change.
- ``read_graph`` + ``scaffold``: the config.pbtxt and the spec (v2, placeholders marked ``TODO``)
  of a new ONNX model.
- ``migrate`` + ``spec_yaml``: the version 2 document of a version 1 spec.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import onnx
import yaml
from google.protobuf import text_format
from pydantic import BaseModel
from tritonclient.grpc import model_config_pb2

from medmesh_cli.devstack.model_repository import parse_config, versions_by_policy
from medmesh_contracts.modelspec import (
    LOINC,
    SNOMED,
    SPEC_SCHEMA,
    InputDatatype,
    ModelSpec,
    OutputDatatype,
    TritonTarget,
    VersionSpec,
    parse_spec,
    version_problems,
)
from medmesh_contracts.modelspec_v1 import upgrade

CONFIG_FILE = "config.pbtxt"
ONNX_PLATFORM = "onnxruntime_onnx"
ONNX_BACKEND = "onnxruntime"
PYTHON_BACKEND = "python"
DEFAULT_ONNX_FILE = "model.onnx"
DEFAULT_PYTHON_FILE = "model.py"
V1_SCHEMA = "medmesh.ModelSpec/1"
# What `new` writes where the model owner has to fill something in; `validate` and `deploy`
# refuse a spec while any of its texts still holds it.
PLACEHOLDER = "TODO"
REPORT_SYSTEM = "https://medmesh.dev/fhir/CodeSystem/report"
V2_0074 = "http://terminology.hl7.org/CodeSystem/v2-0074"
INPUT_DATATYPES: tuple[str, ...] = get_args(InputDatatype)
OUTPUT_DATATYPES: tuple[str, ...] = get_args(OutputDatatype)
# A Triton model name (a folder of the repository).
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

# ONNX tensor element types Triton can serve, and their Triton (KServe v2) datatype names; the
# others (complex, float8, 4-bit types) have no Triton datatype.
_ONNX_TO_TRITON: dict[int, str] = {
    onnx.TensorProto.FLOAT: "FP32",
    onnx.TensorProto.DOUBLE: "FP64",
    onnx.TensorProto.FLOAT16: "FP16",
    onnx.TensorProto.BFLOAT16: "BF16",
    onnx.TensorProto.INT8: "INT8",
    onnx.TensorProto.INT16: "INT16",
    onnx.TensorProto.INT32: "INT32",
    onnx.TensorProto.INT64: "INT64",
    onnx.TensorProto.UINT8: "UINT8",
    onnx.TensorProto.UINT16: "UINT16",
    onnx.TensorProto.UINT32: "UINT32",
    onnx.TensorProto.UINT64: "UINT64",
    onnx.TensorProto.BOOL: "BOOL",
    onnx.TensorProto.STRING: "BYTES",
}

Role = Literal["input", "output"]
Dim = int | str


# --- ONNX graphs -------------------------------------------------------------------------------


@dataclass(frozen=True)
class GraphTensor:
    """One input or output of an ONNX graph.

    ``type_name`` is ONNX's (``float``, ``int64``, ``seq(map(int64,tensor(float)))``);
    ``datatype`` the Triton datatype of a tensor, None when Triton has none for it (complex,
    float8, a sequence or map); ``dims`` the shape, a symbolic dimension as its name (``?`` when
    unnamed), None when the graph gives no shape.
    """

    name: str
    type_name: str
    datatype: str | None
    dims: tuple[Dim, ...] | None

    @property
    def shape_text(self) -> str:
        """The shape as ``[batch, 7]``."""
        if self.dims is None:
            return "(no shape)"
        return "[" + ", ".join(str(d) for d in self.dims) + "]"


@dataclass(frozen=True)
class OnnxGraph:
    """The inputs (initializers excluded) and outputs of an ONNX model."""

    inputs: tuple[GraphTensor, ...]
    outputs: tuple[GraphTensor, ...]

    def tensors(self, role: Role) -> dict[str, GraphTensor]:
        """The graph's inputs or outputs by name."""
        return {t.name: t for t in (self.inputs if role == "input" else self.outputs)}


def _type_name(proto: onnx.TypeProto) -> str:
    kind = proto.WhichOneof("value")
    if kind == "tensor_type":
        return onnx.TensorProto.DataType.Name(proto.tensor_type.elem_type).lower()
    if kind == "sequence_type":
        return f"seq({_type_name(proto.sequence_type.elem_type)})"
    if kind == "map_type":
        key = onnx.TensorProto.DataType.Name(proto.map_type.key_type).lower()
        return f"map({key},{_type_name(proto.map_type.value_type)})"
    if kind == "optional_type":
        return f"optional({_type_name(proto.optional_type.elem_type)})"
    if kind == "sparse_tensor_type":
        elem = onnx.TensorProto.DataType.Name(proto.sparse_tensor_type.elem_type).lower()
        return f"sparse_tensor({elem})"
    return str(kind or "unknown")


def _graph_tensor(value: onnx.ValueInfoProto) -> GraphTensor:
    proto = value.type
    if proto.WhichOneof("value") != "tensor_type":
        return GraphTensor(value.name, _type_name(proto), None, None)
    tensor = proto.tensor_type
    dims: tuple[Dim, ...] | None = None
    if tensor.HasField("shape"):
        dims = tuple(
            d.dim_value
            if d.WhichOneof("value") == "dim_value"
            else (d.dim_param if d.WhichOneof("value") == "dim_param" else "?")
            for d in tensor.shape.dim
        )
    return GraphTensor(value.name, _type_name(proto), _ONNX_TO_TRITON.get(tensor.elem_type), dims)


def graph_of(model: onnx.ModelProto) -> OnnxGraph:
    """The graph inputs and outputs of an ONNX model (initializers listed as inputs left out)."""
    initializers = {i.name for i in model.graph.initializer}
    return OnnxGraph(
        inputs=tuple(_graph_tensor(v) for v in model.graph.input if v.name not in initializers),
        outputs=tuple(_graph_tensor(v) for v in model.graph.output),
    )


def read_graph(path: Path) -> OnnxGraph:
    """The graph of an ONNX file (or of a folder's model.onnx, as Triton accepts); external
    weights are not read. ValueError when the file is not an ONNX model."""
    if path.is_dir():
        path = path / DEFAULT_ONNX_FILE
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's decode errors and onnx's checks have no common base
        raise ValueError(f"{path} is not an ONNX model: {exc}") from exc
    if not model.graph.output:
        raise ValueError(f"{path} is not an ONNX model (its graph has no outputs)")
    return graph_of(model)


# --- Triton config.pbtxt -----------------------------------------------------------------------


def config_datatype(data_type: int) -> str:
    """The Triton datatype name of a config ``data_type`` (TYPE_FP32 -> FP32, TYPE_STRING ->
    BYTES)."""
    name = str(model_config_pb2.DataType.Name(data_type))
    return "BYTES" if name == "TYPE_STRING" else name.removeprefix("TYPE_")


def config_type_name(datatype: str) -> str:
    """The config.pbtxt ``data_type`` of a Triton datatype (FP32 -> TYPE_FP32)."""
    return "TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}"


def model_kind(config: Any) -> Literal["onnx", "python"] | None:
    """How Triton runs a model folder: ``onnx`` (ONNX Runtime), ``python`` (model.py), or None
    for a platform/backend medmesh does not serve."""
    if config.platform == ONNX_PLATFORM or config.backend == ONNX_BACKEND:
        return "onnx"
    if config.backend == PYTHON_BACKEND and not config.platform:
        return "python"
    return None


def _dims_text(dims: Iterable[int]) -> str:
    return "[" + ", ".join(str(d) for d in dims) + "]"


# --- checking a spec against a repository ------------------------------------------------------


@dataclass
class VersionCheck:
    """The outcome of checking one spec version: its problems, and what was checked."""

    version: int
    summary: str
    problems: list[str] = field(default_factory=list)


@dataclass
class SpecCheck:
    """The outcome of checking a spec: problems of the spec as a whole, and of each version."""

    source: str
    problems: list[str]
    versions: list[VersionCheck]

    @property
    def all_problems(self) -> list[str]:
        """Every problem, the spec's first."""
        return [*self.problems, *(p for v in self.versions for p in v.problems)]


def show_path(path: Path) -> str:
    """A path as the user would type it: relative to the working directory when inside it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


_HINTS = {
    "code": "set the code (a LOINC code for a reading or an observation, SNOMED CT for a class)",
    "system": "set the code system (e.g. http://loinc.org)",
    "display": "describe it in words a clinician reads",
    "unit": "set its UCUM unit (e.g. /min, mm[Hg], %, 1 for a ratio)",
    "owner": "name the team that owns the model",
    "algorithm": "say how the model computes its output",
    "intended_use": "say what the model is for (the card is reported on the report's Device)",
    "training_data": "say what data the model was trained and tested on",
    "limitations": "say where the model must not be trusted",
    "text": "describe the range",
}


def _walk_placeholders(value: Any, path: str, found: list[tuple[str, str]]) -> None:
    if isinstance(value, str):
        if PLACEHOLDER in value:
            found.append((path, value))
    elif isinstance(value, Mapping):
        for key, item in value.items():
            _walk_placeholders(item, f"{path}.{key}" if path else str(key), found)
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            label: Any = index
            if isinstance(item, Mapping):
                if path == "versions" and "version" in item:
                    label = f"version={item['version']}"
                elif isinstance(item.get("name"), str):
                    label = item["name"]
            _walk_placeholders(item, f"{path}[{label}]", found)


def placeholders(spec: ModelSpec, versions: Iterable[int] | None = None) -> list[tuple[str, str]]:
    """The fields of a spec still holding a ``TODO`` placeholder, as (path, text); with
    ``versions``, those of other versions are left out."""
    document = spec.model_dump(mode="json", by_alias=True)
    wanted = None if versions is None else set(versions)
    if wanted is not None:
        document["versions"] = [v for v in document["versions"] if v["version"] in wanted]
    found: list[tuple[str, str]] = []
    _walk_placeholders(document, "", found)
    return found


def placeholder_problems(
    spec: ModelSpec, source: str, versions: Iterable[int] | None = None
) -> list[str]:
    """One problem per placeholder left in the spec, saying what to fill in."""
    problems = []
    for path, text in placeholders(spec, versions):
        leaf = re.sub(r"\[[^\]]*\]$", "", path.rsplit(".", 1)[-1])
        hint = _HINTS.get(leaf, "replace it")
        problems.append(f"{source}: {path} is still a placeholder ({text!r}): {hint}")
    return problems


@dataclass
class _Context:
    """What the tensor checks of one version need."""

    prefix: str
    config_path: str
    config: Any
    graph: OnnxGraph | None
    onnx_path: str


def _check_tensor(
    ctx: _Context,
    role: Role,
    name: str,
    datatype: str,
    shape: tuple[int, ...],
    problems: list[str],
) -> None:
    """One tensor the spec declares, against config.pbtxt and the ONNX graph."""
    config_tensors = {
        t.name: t for t in (ctx.config.input if role == "input" else ctx.config.output)
    }
    graph_shape: tuple[int, ...] = shape
    configured = config_tensors.get(name)
    p = ctx.prefix
    if configured is None:
        problems.append(
            f"{p}{role} tensor {name} is not an {role} in {ctx.config_path}: add it there"
            f' ({role} {{ name: "{name}" data_type: {config_type_name(datatype)}'
            f" dims: {_dims_text(shape)} }}) or fix the spec's triton.{role}s"
        )
    else:
        in_config = config_datatype(configured.data_type)
        if in_config != datatype:
            problems.append(
                f"{p}{role} tensor {name} is {datatype} in the spec but {in_config} in"
                f" {ctx.config_path} (data_type: {config_type_name(in_config)}); set datatype:"
                f" {in_config} in the spec or data_type: {config_type_name(datatype)} in"
                f" {ctx.config_path}"
            )
        dims = tuple(int(d) for d in configured.dims)
        if dims != shape:
            variable = " (medmesh sends fixed shapes: no -1)" if -1 in dims else ""
            problems.append(
                f"{p}{role} tensor {name} has shape {_dims_text(shape)} in the spec but dims"
                f" {_dims_text(dims)} in {ctx.config_path}{variable}; set shape:"
                f" {_dims_text(dims)} in the spec or dims: {_dims_text(shape)} in"
                f" {ctx.config_path} (both without the batch dimension)"
            )
        if configured.HasField("reshape"):
            graph_shape = tuple(int(d) for d in configured.reshape.shape)
    if ctx.graph is not None:
        _check_graph_tensor(ctx, role, name, datatype, shape, graph_shape, problems)


def _unsupported(role: Role, tensor: GraphTensor) -> str | None:
    """Why medmesh or Triton cannot use a graph tensor of this role; None when they can."""
    if tensor.datatype is None:
        return (
            f"{tensor.type_name}, which Triton cannot serve (unsupported type); re-export the"
            f" model with a numeric tensor {role} (e.g. float)"
        )
    if role == "input" and tensor.datatype not in INPUT_DATATYPES:
        return (
            f"{tensor.datatype} ({tensor.type_name}), which medmesh cannot feed (unsupported"
            f" input type: inputs are built from FHIR numbers as {', '.join(INPUT_DATATYPES)});"
            " re-export the model with a float input (cast inside the graph where it needs"
            " another type)"
        )
    if role == "output" and tensor.datatype not in OUTPUT_DATATYPES:
        return (
            f"{tensor.datatype} ({tensor.type_name}), which medmesh cannot read (unsupported"
            f" output type; it reads {', '.join(OUTPUT_DATATYPES)}); re-export the model with"
            " a numeric output of one of those types"
        )
    return None


def _check_graph_tensor(
    ctx: _Context,
    role: Role,
    name: str,
    datatype: str,
    shape: tuple[int, ...],
    graph_shape: tuple[int, ...],
    problems: list[str],
) -> None:
    """One tensor the spec declares, against the ONNX graph (``graph_shape``: its shape as the
    model sees it, after a config reshape)."""
    if ctx.graph is None:
        return
    p, where = ctx.prefix, ctx.onnx_path
    tensors = ctx.graph.tensors(role)
    tensor = tensors.get(name)
    if tensor is None:
        problems.append(
            f"{p}{role} tensor {name} is not an {role} of {where} (its {role}s: {sorted(tensors)});"
            f" rename it in the spec and {ctx.config_path}, or re-export the model with that name"
        )
        return
    why = _unsupported(role, tensor)
    if why is not None:
        problems.append(f"{p}{role} tensor {name} is {why} ({where})")
        return
    if tensor.datatype != datatype:
        problems.append(
            f"{p}{role} tensor {name} is {datatype} in the spec but {tensor.datatype} in {where}"
            f" ({tensor.type_name}); set datatype: {tensor.datatype} in the spec (and data_type:"
            f" {config_type_name(str(tensor.datatype))} in {ctx.config_path}) or re-export the"
            " model"
        )
    dims = tensor.dims
    expected = "[" + ", ".join(["batch", *(str(d) for d in graph_shape)]) + "]"
    if dims is None:
        problems.append(
            f"{p}{role} tensor {name} has no shape in {where}; re-export the model with its"
            f" shape {expected} (batch dimension first)"
        )
        return
    if dims and isinstance(dims[0], int) and dims[0] >= 0:
        problems.append(
            f"{p}{role} tensor {name} has its batch dimension (the first) fixed at {dims[0]} in"
            f" {where} ({tensor.shape_text}); Triton batches rows, so re-export the model with"
            " a dynamic first axis (a dim_param, e.g. torch.onnx.export(...,"
            f" dynamic_axes={{'{name}': {{0: 'batch'}}}}))"
        )
    rest = dims[1:]
    fits = len(rest) == len(graph_shape) and all(
        not isinstance(d, int) or d < 0 or d == e for d, e in zip(rest, graph_shape, strict=True)
    )
    if len(dims) == 0 or not fits:
        if graph_shape != shape:
            fix = f"fix the reshape of {name} in {ctx.config_path} or re-export the model"
        else:
            fix = (
                f"set shape: {_dims_text(d if isinstance(d, int) else -1 for d in rest)} in the"
                f" spec (and dims in {ctx.config_path}) or re-export the model"
            )
        problems.append(
            f"{p}{role} tensor {name} has shape {tensor.shape_text} in {where} but the spec"
            f" declares {_dims_text(shape)}, i.e. {expected} with the batch dimension; {fix}"
        )


def _read_model_config(model_dir: Path, prefix: str, problems: list[str]) -> Any | None:
    """The model folder's ModelConfig; None (with the problem) when it is absent or unreadable."""
    config_file = model_dir / CONFIG_FILE
    if not config_file.is_file():
        problems.append(
            f"{prefix}{show_path(config_file)} is missing: write the model's Triton config"
        )
        return None
    try:
        return parse_config(config_file.read_text())
    except text_format.ParseError as exc:
        problems.append(
            f"{prefix}{show_path(config_file)} does not parse as a Triton config: {exc}"
        )
        return None


def _check_config(config: Any, target: TritonTarget, ctx: _Context, problems: list[str]) -> None:
    """The config's name, platform/backend and batching."""
    prefix, config_path = ctx.prefix, ctx.config_path
    if config.name and config.name != target.model:
        problems.append(
            f'{prefix}{config_path} names the model "{config.name}" but its folder is'
            f' {target.model}: set name: "{target.model}" (or leave name out)'
        )
    if model_kind(config) is None:
        declared = (
            f'platform "{config.platform}"'
            if config.platform
            else (f'backend "{config.backend}"' if config.backend else "no platform or backend")
        )
        problems.append(
            f"{prefix}{config_path} declares {declared}, which medmesh does not serve: set"
            f' platform: "{ONNX_PLATFORM}" for an ONNX model or backend: "{PYTHON_BACKEND}"'
            " for a model.py"
        )
    if config.max_batch_size <= 0:
        problems.append(
            f"{prefix}{config_path} has max_batch_size {config.max_batch_size}: medmesh sends"
            f" batches (batch dimension first, left out of dims); set max_batch_size:"
            f" {target.max_batch_size} (at least 1)"
        )
    elif target.max_batch_size > config.max_batch_size:
        problems.append(
            f"{prefix}the spec's triton.max_batch_size {target.max_batch_size} exceeds"
            f" max_batch_size {config.max_batch_size} in {config_path} (Triton would refuse"
            f" larger batches): set max_batch_size: {config.max_batch_size} or less in the"
            f" spec, or raise it in {config_path}"
        )


def _model_file(
    config: Any, model_dir: Path, target: TritonTarget, ctx: _Context, problems: list[str]
) -> Path | None:
    """The version's model file (model.onnx, model.py); None (with the problem) when the
    version folder or the file is missing or the version is not served."""
    kind = model_kind(config)
    default = DEFAULT_ONNX_FILE if kind == "onnx" else DEFAULT_PYTHON_FILE
    present = sorted(int(d.name) for d in model_dir.iterdir() if d.is_dir() and d.name.isdigit())
    version_dir = model_dir / str(target.version)
    if target.version not in present:
        problems.append(
            f"{ctx.prefix}the version folder {show_path(version_dir)} does not exist (versions"
            f" there: {present}): create it with the version's {default}, or set"
            " triton.version in the spec to one of those"
        )
        return None
    if target.version not in versions_by_policy(config, present):
        problems.append(
            f"{ctx.prefix}the version_policy of {ctx.config_path} does not serve version"
            f" {target.version}: set version_policy: {{ all {{ }} }} or list the version"
        )
    model_file = version_dir / (config.default_model_filename or default)
    if kind is None:
        return None
    if not model_file.exists():
        problems.append(
            f"{ctx.prefix}{show_path(model_file)} is missing: put the version's"
            f" {'ONNX model' if kind == 'onnx' else 'Triton python model'} there"
        )
        return None
    return model_file


def check_version(
    spec: ModelSpec, version: VersionSpec, repository: Path, source: str
) -> VersionCheck:
    """One spec version against its Triton model folder (and ONNX graph) in ``repository``."""
    target = version.triton
    prefix = f"{source} version {version.version}: "
    problems = [f"{prefix}{p}" for p in version_problems(spec, version)]
    check = VersionCheck(version.version, f"Triton {target.model} v{target.version}", problems)
    model_dir = repository / target.model
    if not model_dir.is_dir():
        problems.append(
            f"{prefix}the Triton model folder {show_path(model_dir)} does not exist: create it"
            f" (`medmesh models new {target.model} --onnx FILE` scaffolds an ONNX one), fix"
            " triton.model in the spec, or pass the repository that holds it (--repository)"
        )
        return check
    config = _read_model_config(model_dir, prefix, problems)
    if config is None:
        return check
    ctx = _Context(prefix, show_path(model_dir / CONFIG_FILE), config, None, "")
    _check_config(config, target, ctx, problems)
    model_file = _model_file(config, model_dir, target, ctx, problems)
    kind = model_kind(config)
    if kind == "onnx" and model_file is not None:
        ctx.onnx_path = show_path(model_file)
        try:
            ctx.graph = read_graph(model_file)
        except ValueError as exc:
            problems.append(f"{prefix}{exc}: re-export the model")
    for tensor in target.inputs:
        _check_tensor(ctx, "input", tensor.name, tensor.datatype, tensor.shape, problems)
    for output in target.outputs:
        _check_tensor(ctx, "output", output.name, output.datatype, output.shape, problems)
    _check_undeclared(ctx, version, problems)
    if kind == "onnx":
        check.summary += f" (ONNX: {ctx.onnx_path or 'no graph'} and config.pbtxt checked)"
    elif kind == "python":
        check.summary += " (python backend: config.pbtxt checked)"
    tensors = ", ".join(f"{t.name} {t.datatype}{list(t.shape)}" for t in target.inputs)
    outputs = ", ".join(f"{t.name} {t.datatype}{list(t.shape)}" for t in target.outputs)
    check.summary += f", {tensors} -> {outputs}"
    return check


def _check_undeclared(ctx: _Context, version: VersionSpec, problems: list[str]) -> None:
    """Tensors the config or graph needs that the spec does not declare."""
    p = ctx.prefix
    fed = {t.name for t in version.triton.inputs}
    read = {t.name for t in version.triton.outputs}
    for configured in ctx.config.input:
        if configured.name not in fed and not configured.optional:
            problems.append(
                f"{p}{ctx.config_path} declares input {configured.name}, which the spec does not"
                " feed (Triton would refuse every request without it): declare it in the spec's"
                " triton.inputs, or remove it (or mark it optional: true)"
            )
    if ctx.graph is None:
        return
    graph_inputs = ctx.graph.tensors("input")
    graph_outputs = ctx.graph.tensors("output")
    for name, tensor in graph_inputs.items():
        if name not in fed:
            problems.append(
                f"{p}{ctx.onnx_path} needs input {name} ({tensor.type_name}"
                f" {tensor.shape_text}), which the spec does not feed: declare it in the spec"
                f" and {ctx.config_path}, or re-export the model without it"
            )
    for configured in ctx.config.output:
        if configured.name not in read and configured.name not in graph_outputs:
            problems.append(
                f"{p}{ctx.config_path} declares output {configured.name}, which"
                f" {ctx.onnx_path} does not produce (its outputs: {sorted(graph_outputs)}):"
                " remove it or rename it"
            )


def check_spec(
    spec: ModelSpec,
    repository: Path,
    *,
    versions: Iterable[int] | None = None,
    source: str | None = None,
) -> SpecCheck:
    """Check a spec (or some of its versions) against a Triton model repository, offline.

    KeyError when ``versions`` names a version the spec does not declare.
    """
    label = source or f"model spec {spec.name}"
    chosen = [spec.version(n) for n in versions] if versions is not None else list(spec.versions)
    return SpecCheck(
        source=label,
        problems=placeholder_problems(spec, label, [v.version for v in chosen]),
        versions=[check_version(spec, v, repository, label) for v in chosen],
    )


def validate_spec_against_repository(
    spec: ModelSpec,
    repository: Path,
    *,
    versions: Iterable[int] | None = None,
    source: str | None = None,
) -> list[str]:
    """Every problem between a spec (or the given versions) and the Triton model folders of
    ``repository`` (config.pbtxt, ONNX graphs), plus the spec's own: empty when they agree."""
    return check_spec(spec, repository, versions=versions, source=source).all_problems


def default_repository(spec_file: Path, checkout: Path) -> Path:
    """The Triton model repository a spec file is checked against: ``models/`` beside the
    spec's ``specs/`` folder where there is one (the layout ``medmesh up --overlay`` writes under
    var/), else the checkout's ``deploy/triton/models``."""
    folder = spec_file.resolve().parent
    beside = folder.parent / "models"
    if folder.name == "specs" and beside.is_dir():
        return beside
    return checkout / "deploy" / "triton" / "models"


# --- YAML --------------------------------------------------------------------------------------


class _SpecDumper(yaml.SafeDumper):
    """YAML as the committed specs are written: block lists indented under their key, flat
    short mappings and lists of scalars in flow style."""

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        super().increase_indent(flow, False)


def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, str | int | float | bool)


def _flat(value: Any) -> bool:
    if isinstance(value, list):
        return all(_scalar(v) for v in value)
    return _scalar(value)


class _Block(dict[Any, Any]):
    """A mapping always written in block style (a document's top level)."""


def _represent_dict(dumper: yaml.SafeDumper, data: dict[Any, Any]) -> yaml.Node:
    short = (
        not isinstance(data, _Block)
        and bool(data)
        and all(_flat(v) for v in data.values())
        and len(yaml.safe_dump(data, default_flow_style=True, width=10_000)) <= 100
    )
    return dumper.represent_mapping("tag:yaml.org,2002:map", data.items(), flow_style=short)


def _represent_list(dumper: yaml.SafeDumper, data: list[Any]) -> yaml.Node:
    return dumper.represent_sequence(
        "tag:yaml.org,2002:seq", data, flow_style=bool(data) and all(_scalar(v) for v in data)
    )


_SpecDumper.add_representer(dict, _represent_dict)
_SpecDumper.add_representer(_Block, _represent_dict)
_SpecDumper.add_representer(list, _represent_list)


def to_yaml(document: Any) -> str:
    """YAML text of a plain document, keys in their order."""
    if isinstance(document, dict):
        document = _Block(document)
    text: str = yaml.dump(
        document, Dumper=_SpecDumper, sort_keys=False, allow_unicode=True, width=100
    )
    return text


# Fields written even at their default: what a reader needs to see (the schema says which spec
# version the file is; tensor datatypes and shapes). Output kinds are written too: a ``kind``
# of one possible value is a discriminator, which a spec needs to load.
_ALWAYS = {"schema_id", "datatype", "shape"}


def _always(name: str, info: Any) -> bool:
    return name in _ALWAYS or (name == "kind" and len(get_args(info.annotation)) == 1)


def plain(value: Any) -> Any:
    """A spec model as a plain document: fields in declaration order, defaults left out but for
    the schema, output kinds and tensor datatypes and shapes; dict keys kept (int versions)."""
    if isinstance(value, BaseModel):
        out: dict[str, Any] = {}
        for name, info in type(value).model_fields.items():
            item = getattr(value, name)
            if (
                not _always(name, info)
                and not info.is_required()
                and item == info.get_default(call_default_factory=True)
            ):
                continue
            out[info.alias or name] = plain(item)
        return out
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


def spec_yaml(spec: ModelSpec, header: str = "") -> str:
    """The YAML of a v2 spec, after ``header`` (comment lines); it loads back equal to ``spec``
    (checked: RuntimeError otherwise)."""
    document: dict[str, Any] = plain(spec)
    scalars = {k: v for k, v in document.items() if _scalar(v)}
    blocks = [to_yaml(scalars)] if scalars else []
    blocks += [to_yaml({k: v}) for k, v in document.items() if k not in scalars]
    text = header + "\n".join(blocks)
    if parse_spec(yaml.safe_load(text)) != spec:
        raise RuntimeError(f"the YAML written for {spec.name} does not load back the same spec")
    return text


def leading_comments(text: str) -> str:
    """The comment lines a YAML file starts with (its header)."""
    lines = []
    for line in text.splitlines(keepends=True):
        if not line.startswith("#"):
            break
        lines.append(line)
    return "".join(lines)


# --- migrate (v1 -> v2) ------------------------------------------------------------------------


class MigrationError(ValueError):
    """A document that ``migrate`` does not turn into a version 2 spec, and why."""


def migrate(document: Any, source: str = "the spec") -> ModelSpec:
    """The version 2 spec of a version 1 spec document (``modelspec_v1.upgrade``);
    MigrationError for a version 2 (or unknown) document or an invalid version 1 one."""
    if not isinstance(document, dict):
        raise MigrationError(f"{source} is not a model spec (a YAML mapping)")
    schema = document.get("schema")
    if schema == SPEC_SCHEMA:
        raise MigrationError(f"{source} is already a {SPEC_SCHEMA} spec: nothing to migrate")
    if schema != V1_SCHEMA:
        raise MigrationError(
            f"{source} has schema {schema!r}: migrate reads {V1_SCHEMA} specs only"
        )
    try:
        return upgrade({k: v for k, v in document.items() if not str(k).startswith("x-")})
    except ValueError as exc:
        raise MigrationError(f"{source} is not a valid {V1_SCHEMA} spec: {exc}") from exc


def migrated_text(original: str, source: str = "the spec") -> str:
    """The version 2 YAML of a version 1 spec file's text, keeping its leading comments."""
    spec = migrate(yaml.safe_load(original), source)
    header = leading_comments(original)
    note = f"# Migrated from {V1_SCHEMA} to {SPEC_SCHEMA} by `medmesh models migrate`"
    note += "\n# (the comments above are the version 1 file's).\n" if header else ".\n"
    return spec_yaml(spec, header + note)


# --- new (scaffold from ONNX) ------------------------------------------------------------------


class ScaffoldError(ValueError):
    """Why a model cannot be scaffolded from an ONNX graph (one line per problem)."""


@dataclass(frozen=True)
class _Plan:
    """One graph tensor as the scaffold declares it."""

    name: str
    datatype: str
    shape: tuple[int, ...]  # without the batch dimension, as the spec and config dims say
    reshape: bool  # a graph tensor of rank 1 ([batch]): dims [1], reshape to []

    @property
    def elements(self) -> int:
        count = 1
        for d in self.shape:
            count *= d
        return count


def _plan(role: Role, tensor: GraphTensor, problems: list[str], where: str) -> _Plan | None:
    why = _unsupported(role, tensor)
    if why is not None:
        problems.append(f"{role} {tensor.name} of {where} is {why}")
        return None
    if tensor.dims is None or not tensor.dims:
        problems.append(
            f"{role} {tensor.name} of {where} has no shape (or is a scalar); re-export the model"
            " with shapes, batch dimension first"
        )
        return None
    batch, rest = tensor.dims[0], tensor.dims[1:]
    if isinstance(batch, int) and batch >= 0:
        problems.append(
            f"{role} {tensor.name} of {where} has its batch dimension (the first) fixed at"
            f" {batch} ({tensor.shape_text}); re-export the model with a dynamic first axis"
            f" (e.g. torch.onnx.export(..., dynamic_axes={{'{tensor.name}': {{0: 'batch'}}}}))"
        )
        return None
    symbolic = [d for d in rest if not isinstance(d, int) or d < 1]
    if symbolic:
        problems.append(
            f"{role} {tensor.name} of {where} has dimensions of no fixed size {symbolic}"
            f" ({tensor.shape_text}); medmesh tensors have fixed sizes: re-export the model with"
            " them fixed"
        )
        return None
    datatype = str(tensor.datatype)  # not None: _unsupported checked it
    if not rest:
        return _Plan(tensor.name, datatype, (1,), reshape=True)
    return _Plan(tensor.name, datatype, tuple(int(d) for d in rest), reshape=False)


def _feature_names(tensor: str, count: int) -> list[str]:
    stem = re.sub(r"[^A-Za-z0-9_]", "_", tensor)
    return [f"{stem}_{i}" for i in range(count)]


def _todo(what: str = "") -> str:
    return f"{PLACEHOLDER}: {what}" if what else PLACEHOLDER


def _coding(system: str, display: str = "") -> dict[str, str]:
    return {"system": system, "code": PLACEHOLDER, "display": _todo(display)}


def _config(name: str, inputs: list[_Plan], outputs: list[_Plan], max_batch_size: int) -> Any:
    config = model_config_pb2.ModelConfig()
    config.name = name
    config.platform = ONNX_PLATFORM
    config.max_batch_size = max_batch_size
    for plans, tensors in ((inputs, config.input), (outputs, config.output)):
        for plan in plans:
            tensor = tensors.add()
            tensor.name = plan.name
            tensor.data_type = model_config_pb2.DataType.Value(config_type_name(plan.datatype))
            tensor.dims.extend(plan.shape)
            if plan.reshape:
                tensor.reshape.SetInParent()
    config.version_policy.all.SetInParent()
    config.dynamic_batching.max_queue_delay_microseconds = 2000
    group = config.instance_group.add()
    group.kind = model_config_pb2.ModelInstanceGroup.KIND_CPU
    group.count = 1
    return config


def _outputs(plans: list[_Plan]) -> list[dict[str, Any]]:
    outputs: list[dict[str, Any]] = []
    for plan in plans:
        if plan.elements == 1:
            outputs.append(
                {
                    "kind": "quantity",
                    "tensor": plan.name,
                    "code": _coding(LOINC, f"what {plan.name} is"),
                    "unit": PLACEHOLDER,
                }
            )
        else:
            outputs.append(
                {
                    "kind": "classification",
                    "tensor": plan.name,
                    "code": _coding(LOINC, f"what is classified ({plan.name})"),
                    "classes": [
                        {"code": _coding(SNOMED, f"class {i} of {plan.name}")}
                        for i in range(plan.elements)
                    ],
                }
            )
    return outputs


# A features tensor wider than this is likely a signal: `new` suggests --waveform for it.
WIDE_FEATURES = 64


def _feed(plan: _Plan, *, waveform: bool) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The FHIR inputs feeding one input tensor (placeholders), and the tensor's declaration."""
    tensor: dict[str, Any] = {
        "name": plan.name,
        "datatype": plan.datatype,
        "shape": list(plan.shape),
        "feed": "waveform" if waveform else "features",
    }
    if waveform:
        input_name = _feature_names(plan.name, 1)[0]
        tensor["inputs"] = [input_name]
        signal = {
            "name": input_name,
            "display": _todo(
                f"which signal {plan.name} holds; check waveform.sample_rate_hz (250 Hz here)"
            ),
            "unit": PLACEHOLDER,
            "waveform": {"sample_rate_hz": 250, "samples": plan.elements},
            "sources": [
                {"code": _coding(LOINC, f"the Observation of {input_name}"), "kind": "waveform"}
            ],
        }
        return [signal], tensor
    names = _feature_names(plan.name, plan.elements)
    tensor["inputs"] = names
    fed = [
        {
            "name": input_name,
            "display": _todo(f"what column {i} of {plan.name} is"),
            "unit": PLACEHOLDER,
            "sources": [{"code": _coding(LOINC, f"the reading of {input_name}")}],
        }
        for i, input_name in enumerate(names)
    ]
    return fed, tensor


def wide_features(graph: OnnxGraph, waveforms: Iterable[str] = ()) -> list[str]:
    """Input tensors `new` would feed as features with more than WIDE_FEATURES values (likely
    signals, better fed with --waveform)."""
    wide = []
    for tensor in graph.inputs:
        dims = tensor.dims or ()
        sizes = [d for d in dims[1:] if isinstance(d, int) and d > 0]
        count = 1
        for d in sizes:
            count *= d
        if tensor.name not in set(waveforms) and count > WIDE_FEATURES:
            wide.append(tensor.name)
    return wide


@dataclass(frozen=True)
class Scaffold:
    """The files ``medmesh models new`` writes: the Triton config and the model spec."""

    config_text: str
    spec_text: str
    spec: ModelSpec


def scaffold(
    name: str,
    graph: OnnxGraph,
    *,
    max_batch_size: int = 64,
    onnx_source: str = "model.onnx",
    model_folder: str = "",
    spec_file: str = "",
    waveforms: Iterable[str] = (),
) -> Scaffold:
    """The config.pbtxt and the v2 spec of a new ONNX model ``name`` (version 1), from its
    graph. The spec loads, but its texts to complete are ``TODO`` placeholders, which
    ``validate`` names until they are filled in. ScaffoldError when the graph cannot be served.

    Each input tensor is fed ``features`` (one FHIR input per value), but those named in
    ``waveforms``: fed by one ``waveform`` input (a sampled signal, e.g. an ECG lead)."""
    problems: list[str] = []
    signals = set(waveforms)
    unknown = signals - {t.name for t in graph.inputs}
    if unknown:
        problems.append(
            f"--waveform names {sorted(unknown)}, which are not inputs of {onnx_source}"
            f" (its inputs: {[t.name for t in graph.inputs]})"
        )
    if not MODEL_NAME.match(name):
        problems.append(
            f"{name!r} is not a model name: letters, digits, '-', '_' and '.', starting with a"
            " letter or digit"
        )
    if max_batch_size < 1:
        problems.append(f"--max-batch-size must be at least 1, not {max_batch_size}")
    inputs = [_plan("input", t, problems, onnx_source) for t in graph.inputs]
    outputs = [_plan("output", t, problems, onnx_source) for t in graph.outputs]
    if not graph.inputs:
        problems.append(f"{onnx_source} has no inputs")
    if problems:
        raise ScaffoldError("\n".join(problems))
    ins = [p for p in inputs if p is not None]
    outs = [p for p in outputs if p is not None]
    folder = model_folder or name
    spec_path = spec_file or f"{name}.yaml"

    config_header = (
        f"# Triton model {name}, scaffolded by `medmesh models new` from {onnx_source}.\n"
        f"# ONNX Runtime serves {folder}/1/model.onnx; add versions as numbered folders beside it\n"
        "# (version_policy all serves them all). dims are without the batch dimension: Triton\n"
        "# batches up to max_batch_size rows. Model spec: " + spec_path + ".\n"
        "#\n"
        "# instance_group is KIND_CPU here; the medmesh launcher (medmesh_cli.devstack) rewrites it\n"
        "# to one KIND_GPU instance per GPU where GPUs exist.\n"
    )
    config_text = config_header + text_format.MessageToString(
        _config(name, ins, outs, max_batch_size)
    )

    fhir_inputs: list[dict[str, Any]] = []
    tensors: list[dict[str, Any]] = []
    for plan in ins:
        fed, tensor = _feed(plan, waveform=plan.name in signals)
        fhir_inputs += fed
        tensors.append(tensor)
    version = {
        "version": 1,
        "algorithm": _todo("how the model computes its output (method, framework)"),
        "triton": {
            "model": name,
            "version": 1,
            "inputs": tensors,
            "outputs": [
                {"name": p.name, "datatype": p.datatype, "shape": list(p.shape)} for p in outs
            ],
            "max_batch_size": max_batch_size,
        },
        "outputs": _outputs(outs),
        "card": {
            "intended_use": _todo("what the model is for, and for whom"),
            "training_data": _todo("the data it was trained and tested on"),
            "limitations": _todo("where it must not be trusted"),
        },
    }
    sections: list[tuple[str, dict[str, Any]]] = [
        (
            f"# Model spec ({SPEC_SCHEMA}) of {name}, scaffolded by `medmesh models new` from\n"
            f"# {onnx_source} (served from {folder}/1/model.onnx).\n"
            f"# Complete every {PLACEHOLDER}, then run `medmesh models validate {spec_path}`: it\n"
            f"# lists what is left, and `medmesh models deploy` refuses the spec until nothing is.\n"
            "# See deploy/models/*.yaml for complete specs and\n"
            "# contracts/src/medmesh_contracts/modelspec.py for every field.\n",
            {
                "schema": SPEC_SCHEMA,
                "name": name,
                "display": _todo("what the model does, in one line"),
                "owner": _todo("the team that owns the model"),
            },
        ),
        (
            "# The FHIR readings the model uses: one per column of each input tensor, in column\n"
            "# order. For each: what it is (display), the UCUM unit the model expects (unit), the\n"
            "# LOINC code of the Observation that carries it (sources; more sources, components,\n"
            "# indicators and coded answers: see deploy/models/deterioration.yaml). Rename an\n"
            "# input here and in its tensor's `inputs` list; one the model can do without takes\n"
            "# `required: false` and a `default`. A tensor that holds a signal (an ECG lead) is\n"
            "# fed by one `waveform` input instead (see deploy/models/ecg-rhythm.yaml).\n",
            {"inputs": fhir_inputs},
        ),
        (
            f"# Version 1: Triton model {name} version 1, its tensors as model.onnx declares them\n"
            "# (shapes without the batch dimension). `outputs` turn output tensors into FHIR: a\n"
            "# one-value tensor is scaffolded as a `quantity` (code and UCUM unit), a tensor of\n"
            "# several values as a `classification` (a code per class, in value order, values\n"
            "# being probabilities). Change the kind to what the model computes (risk-score,\n"
            "# findings, explanation: see modelspec.py) and delete the outputs not to report; the\n"
            "# first that is not an explanation is the report's conclusion. Complete or delete\n"
            "# the model card (reported on the report's Device).\n",
            {"versions": [version]},
        ),
        (
            "# How the DiagnosticReport is coded (the category defaults to OTH, other).\n",
            {
                "report": {
                    "code": {
                        "system": REPORT_SYSTEM,
                        "code": name,
                        "display": _todo("the report's title"),
                    },
                    "category": {"system": V2_0074, "code": "OTH", "display": "Other"},
                }
            },
        ),
        (
            "# The starting routing table: percentage of traffic per version.\n",
            {"routing": {"weights": {1: 100}}},
        ),
    ]
    spec_text = "\n".join(comment + to_yaml(section) for comment, section in sections)
    spec = parse_spec(yaml.safe_load(spec_text))
    return Scaffold(config_text=config_text, spec_text=spec_text, spec=spec)
