"""Triton model repositories: read ``config.pbtxt`` and render a repository for where it runs.

``config.pbtxt`` is read and written as Triton's own ``ModelConfig`` protobuf message (shipped in
tritonclient, ``tritonclient.grpc.model_config_pb2``) with protobuf's ``text_format``, so what
Triton would reject fails here too. Rendering copies a model folder and rewrites its config:

- with GPUs, every ``instance_group`` becomes one ``KIND_GPU`` instance per GPU (``gpus: [ i ]``);
  without, a python-backend config is copied byte for byte (``KIND_CPU`` as committed);
- with ``onnx_runner`` (the local ``tritonserver`` of the nvidia-pytriton wheel, which has only
  the python backend), a model with platform ``onnxruntime_onnx`` (or backend ``onnxruntime``)
  becomes a python-backend model of the same name, tensors, batching, version policy and instance
  groups, whose ``<version>/model.py`` is ``medmesh_cli.devstack.onnx_runner`` beside the
  version's ``model.onnx``. NVIDIA's Triton container loads ONNX natively: render for it without
  ``onnx_runner`` (``--onnx=native`` below).

``python -m medmesh_cli.devstack.model_repository --source DIR --target DIR --gpus auto|N
--onnx native|runner`` renders every model of a repository into a target folder (a volume Triton
serves), replacing the models it renders there and removing those no longer in the source: the
compose ``gpu`` profile's ``triton-models`` job and the Dockerfile's ``models`` stage run it.
"""

from __future__ import annotations

import argparse
import importlib
import shutil
import sys
import tempfile
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any

from medmesh_cli.devstack.onnx_runner import DEFAULT_ONNX_FILE, ONNX_FILE_PARAMETER

CONFIG_FILE = "config.pbtxt"
RUNNER_FILE = Path(__file__).with_name("onnx_runner.py")
# What Triton calls the ONNX Runtime model kind, as a platform and as a backend.
ONNX_PLATFORM = "onnxruntime_onnx"
ONNX_BACKEND = "onnxruntime"
# A parameter of rendered runner configs naming what the model was rendered from.
RENDERED_FROM_PARAMETER = "MEDMESH_RENDERED_FROM"
_STAGING_PREFIX = ".render-"
_IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc")


@cache
def text_format() -> Any:
    """protobuf's ``text_format`` (imported when first needed)."""
    return importlib.import_module("google.protobuf.text_format")


@cache
def model_config_pb2() -> Any:
    """Triton's model configuration messages, as tritonclient ships them (untyped, and imported
    when first needed: importing tritonclient.grpc takes about half a second)."""
    return importlib.import_module("tritonclient.grpc.model_config_pb2")


# --- config.pbtxt ------------------------------------------------------------------------------


def parse_config(text: str) -> Any:
    """A config.pbtxt text as Triton's ``ModelConfig`` message; ParseError if Triton would fail."""
    return text_format().Parse(text, model_config_pb2().ModelConfig())


def read_config(model_dir: Path) -> Any:
    """The ``ModelConfig`` of a model folder."""
    return parse_config((model_dir / CONFIG_FILE).read_text())


def config_text(config: Any, header: str = "") -> str:
    """config.pbtxt text of a ``ModelConfig``, after ``header`` (comment lines)."""
    body: str = text_format().MessageToString(config)
    return header + body


def header_comments(text: str) -> str:
    """The comment (and blank) lines a config.pbtxt text starts with."""
    lines: list[str] = []
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            break
        lines.append(line)
    while lines and not lines[-1].strip():
        lines.pop()
    return "".join(f"{line}\n" for line in lines)


def is_onnx(config: Any) -> bool:
    """Whether a model runs on Triton's ONNX Runtime backend (platform or backend)."""
    return bool(config.platform == ONNX_PLATFORM or config.backend == ONNX_BACKEND)


def onnx_file(config: Any) -> str:
    """The ONNX file name in each version folder (``default_model_filename``, else model.onnx)."""
    name: str = config.default_model_filename or DEFAULT_ONNX_FILE
    return name


def set_gpu_instance_groups(config: Any, gpu_count: int) -> None:
    """Replace every instance group of ``config`` with one KIND_GPU instance on each GPU."""
    del config.instance_group[:]
    for gpu in range(gpu_count):
        group = config.instance_group.add()
        group.kind = model_config_pb2().ModelInstanceGroup.KIND_GPU
        group.count = 1
        group.gpus.append(gpu)


def onnx_runner_config(config: Any) -> Any:
    """The python-backend config that runs an ONNX model with ``onnx_runner``.

    Same name, max_batch_size, inputs, outputs, version_policy, batching, instance groups and
    parameters; ``backend: "python"``, and the ONNX file named by the parameter
    ``ONNX_MODEL_FILENAME``. ValueError when the config declares no inputs or outputs (Triton's
    onnxruntime backend could complete them from the graph; the runner's config cannot).
    """
    if not config.input or not config.output:
        raise ValueError(
            f"model {config.name or '(unnamed)'}: config.pbtxt must declare its inputs and "
            "outputs (name, data_type, dims) to be served from ONNX by the python backend"
        )
    rendered = model_config_pb2().ModelConfig()
    rendered.CopyFrom(config)
    for field in ("platform", "runtime", "default_model_filename", "cc_model_filenames"):
        rendered.ClearField(field)
    if rendered.HasField("optimization"):
        # onnxruntime's accelerators (TensorRT, OpenVINO) mean nothing to the python backend.
        rendered.optimization.ClearField("execution_accelerators")
        if rendered.optimization == model_config_pb2().ModelOptimizationPolicy():
            rendered.ClearField("optimization")
    rendered.backend = "python"
    rendered.parameters[ONNX_FILE_PARAMETER].string_value = onnx_file(config)
    rendered.parameters[RENDERED_FROM_PARAMETER].string_value = (
        f"platform {config.platform}" if config.platform else f"backend {config.backend}"
    )
    return rendered


def render_config(text: str, gpu_count: int, *, onnx_runner: bool = False) -> str:
    """config.pbtxt text for a host with ``gpu_count`` GPUs.

    Unchanged when there are no GPUs and nothing else to render; otherwise the message is
    rewritten (KIND_GPU groups; with ``onnx_runner``, an ONNX config becomes the runner's) and
    written after the original's leading comments and a line saying what was rendered.
    """
    config = parse_config(text)
    runner = onnx_runner and is_onnx(config)
    if gpu_count <= 0 and not runner:
        return text
    notes: list[str] = []
    if runner:
        config = onnx_runner_config(config)
        notes.append(
            "# Rendered by medmesh: the ONNX model runs in the python backend (model.py is "
            "medmesh_cli.devstack.onnx_runner)."
        )
    if gpu_count > 0:
        set_gpu_instance_groups(config, gpu_count)
        notes.append(f"# Rendered by medmesh for {gpu_count} GPU(s): one KIND_GPU instance each.")
    header = header_comments(text)
    return config_text(config, header + "".join(f"{n}\n" for n in notes))


# --- versions ----------------------------------------------------------------------------------


def version_folders(model_dir: Path) -> list[int]:
    """The numeric version folders of a model folder, in order."""
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())


def served_versions(model_dir: Path) -> list[int]:
    """The versions Triton serves from a model folder, by its ``version_policy``.

    Numeric subfolders; ``all`` serves every one, ``specific`` the listed ones, ``latest``
    (Triton's default, ``num_versions`` 1 unless set) the highest.
    """
    return versions_by_policy(read_config(model_dir), version_folders(model_dir))


def versions_by_policy(config: Any, present: list[int]) -> list[int]:
    """Which of the version folders ``present`` (ascending) the config's version_policy serves:
    ``all``, ``specific`` ones, or the newest ``latest.num_versions`` (Triton's default: 1)."""
    policy = config.version_policy
    choice = policy.WhichOneof("policy_choice")
    if choice == "all":
        return present
    if choice == "specific":
        listed = {int(v) for v in policy.specific.versions}
        return [v for v in present if v in listed]
    newest = max(1, int(policy.latest.num_versions)) if choice == "latest" else 1
    return present[-newest:]


def repository_models(repository: Path) -> dict[str, list[int]]:
    """Every model of a repository (folders with config.pbtxt) and the versions it serves."""
    return {
        config.parent.name: served_versions(config.parent)
        for config in sorted(repository.glob(f"*/{CONFIG_FILE}"))
    }


# --- rendering ---------------------------------------------------------------------------------


def render_model_in_place(model_dir: Path, gpu_count: int, *, onnx_runner: bool = True) -> None:
    """Render a copied model folder where it is (its config; the runner into ONNX versions)."""
    path = model_dir / CONFIG_FILE
    text = path.read_text()
    config = parse_config(text)
    rendered = render_config(text, gpu_count, onnx_runner=onnx_runner)
    if onnx_runner and is_onnx(config):
        runner = RUNNER_FILE.read_bytes()
        for version in version_folders(model_dir):
            folder = model_dir / str(version)
            if not (folder / onnx_file(config)).exists():
                raise ValueError(f"{folder} has no {onnx_file(config)}")
            (folder / "model.py").write_bytes(runner)
    if rendered != text:
        path.write_text(rendered)


def render_model(
    model_dir: Path, repository: Path, gpu_count: int, *, onnx_runner: bool = True
) -> Path:
    """Render the model folder ``model_dir`` as ``repository/<its name>``, replacing it there.

    The folder is rendered aside (inside ``repository``, hidden) and then moved into place, so a
    model already there (a running server's) is swapped whole: a later load of the model reads
    the new config and versions. Returns the rendered folder.
    """
    model_dir = Path(model_dir)
    if not (model_dir / CONFIG_FILE).is_file():
        raise ValueError(f"{model_dir} is not a Triton model folder (no {CONFIG_FILE})")
    repository.mkdir(parents=True, exist_ok=True)
    target = repository / model_dir.name
    staging = Path(tempfile.mkdtemp(prefix=f"{_STAGING_PREFIX}{model_dir.name}-", dir=repository))
    try:
        built = staging / model_dir.name
        shutil.copytree(model_dir, built, ignore=_IGNORE)
        render_model_in_place(built, gpu_count, onnx_runner=onnx_runner)
        if target.exists():
            target.rename(staging / ".replaced")
        built.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def render_model_repository(
    src: Path, dst: Path, gpu_count: int, *, onnx_runner: bool = True
) -> Path:
    """Copy the model repository ``src`` to ``dst`` (new or empty) for ``gpu_count`` GPUs.

    With GPUs, every model's ``instance_group`` becomes one ``KIND_GPU`` instance per GPU
    (``gpus: [ i ]``); without, python-backend configs are copied as they are (``KIND_CPU``).
    With ``onnx_runner`` (the default: the local tritonserver), ONNX models become python-backend
    models running ``onnx_runner``; without, they stay as they are (NVIDIA's container).
    """
    if dst.exists() and any(dst.iterdir()):
        raise FileExistsError(f"{dst} is not empty; render into a new folder")
    shutil.copytree(src, dst, ignore=_IGNORE, dirs_exist_ok=True)
    for config in sorted(dst.glob(f"*/{CONFIG_FILE}")):
        render_model_in_place(config.parent, gpu_count, onnx_runner=onnx_runner)
    return dst


def sync_model_repository(
    src: Path, dst: Path, gpu_count: int, *, onnx_runner: bool = True
) -> list[str]:
    """Render every model of ``src`` into ``dst`` (replacing each), remove model folders of
    ``dst`` that ``src`` no longer has; the names rendered. ``dst`` may be a volume's root."""
    dst.mkdir(parents=True, exist_ok=True)
    for leftover in dst.glob(f"{_STAGING_PREFIX}*"):
        shutil.rmtree(leftover, ignore_errors=True)
    names = []
    for config in sorted(src.glob(f"*/{CONFIG_FILE}")):
        render_model(config.parent, dst, gpu_count, onnx_runner=onnx_runner)
        names.append(config.parent.name)
    for stale in sorted(dst.iterdir()):
        if stale.is_dir() and stale.name not in names and (stale / CONFIG_FILE).is_file():
            shutil.rmtree(stale)
    return names


# --- command line ------------------------------------------------------------------------------


def _gpu_count(value: str) -> int:
    if value == "auto":
        from medmesh_cli.devstack.triton import detect_gpus  # noqa: PLC0415 (no import cycle)

        return detect_gpus().count
    return max(0, int(value))


def main(argv: Sequence[str] | None = None) -> int:
    """Render a model repository into a target folder (see the module's documentation)."""
    parser = argparse.ArgumentParser(
        prog="python -m medmesh_cli.devstack.model_repository",
        description="Render a Triton model repository for the GPUs of the host that serves it.",
    )
    parser.add_argument("--source", type=Path, required=True, help="the model repository")
    parser.add_argument("--target", type=Path, required=True, help="where Triton reads it")
    parser.add_argument(
        "--gpus",
        default="auto",
        help="GPU count (0: as committed, KIND_CPU), or auto: MEDMESH_GPU_COUNT, NVML, nvidia-smi",
    )
    parser.add_argument(
        "--onnx",
        choices=("native", "runner"),
        default="native",
        help="native: ONNX models as they are (NVIDIA's Triton container); runner: as python "
        "models running onnx_runner (a tritonserver with only the python backend)",
    )
    args = parser.parse_args(argv)
    gpus = _gpu_count(args.gpus)
    names = sync_model_repository(args.source, args.target, gpus, onnx_runner=args.onnx == "runner")
    kind = f"KIND_GPU on {gpus} GPU(s)" if gpus else "instance groups as committed"
    for name in names:
        versions = served_versions(args.target / name)
        print(f"rendered {name} (versions {versions}; {kind}; onnx {args.onnx})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
