"""Run an ONNX model in Triton's python backend: the ``model.py`` of rendered ONNX models.

NVIDIA's Triton container loads a model folder with ``platform: "onnxruntime_onnx"`` natively
(its onnxruntime backend). The ``tritonserver`` of the nvidia-pytriton wheel that ``medmesh up``
and the tests run has only the python backend, so ``render_model_repository``
(medmesh_cli.devstack.model_repository) writes such a model as a python-backend model of the same
name, tensors, batching and instance groups, with this file copied as ``<version>/model.py`` beside
the version's ``model.onnx`` (named by the config parameter ``ONNX_MODEL_FILENAME``).

This file is one module of the cli package (type-checked and tested once) and must also run as a
standalone ``model.py``: it imports numpy and the standard library at module level, onnxruntime
when a session is made, and ``triton_python_backend_utils`` only inside Triton.

- ``OnnxSession``: an onnxruntime session with the request checks (input names, datatypes, ranks
  and fixed dimensions), testable without Triton;
- ``run_requests``: the inputs of several requests run as one batch (requests whose tensors can be
  stacked), the outputs split back per request; a request that fails its checks, or fails in
  onnxruntime, gets its own error, never the others';
- ``TritonPythonModel``: maps Triton requests to ``run_requests`` and its results to responses or
  per-request ``TritonError``.

An instance of kind GPU runs on onnxruntime's CUDAExecutionProvider (on the instance's device)
when the installed onnxruntime offers it, which only onnxruntime-gpu does; otherwise, and for CPU
instances, on the CPUExecutionProvider. The Python environment Triton's python stub runs in (the
virtualenv tritonserver is started from) is the one that needs onnxruntime-gpu for that; NVIDIA's
Triton container never runs this file.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

# The config parameter naming the ONNX file in each version folder, and its default (Triton's).
ONNX_FILE_PARAMETER = "ONNX_MODEL_FILENAME"
DEFAULT_ONNX_FILE = "model.onnx"
# onnxruntime backend parameters this runner honours too (0: onnxruntime's default).
INTRA_OP_THREADS_PARAMETER = "intra_op_thread_count"
INTER_OP_THREADS_PARAMETER = "inter_op_thread_count"
CUDA_PROVIDER = "CUDAExecutionProvider"
CPU_PROVIDER = "CPUExecutionProvider"

Array = npt.NDArray[Any]
Device = Literal["cpu", "gpu"]
Provider = str | tuple[str, dict[str, str]]

# onnxruntime's tensor type names and the numpy datatypes Triton hands to python models.
ORT_DTYPES: dict[str, np.dtype[Any]] = {
    "tensor(float)": np.dtype(np.float32),
    "tensor(double)": np.dtype(np.float64),
    "tensor(float16)": np.dtype(np.float16),
    "tensor(int8)": np.dtype(np.int8),
    "tensor(int16)": np.dtype(np.int16),
    "tensor(int32)": np.dtype(np.int32),
    "tensor(int64)": np.dtype(np.int64),
    "tensor(uint8)": np.dtype(np.uint8),
    "tensor(uint16)": np.dtype(np.uint16),
    "tensor(uint32)": np.dtype(np.uint32),
    "tensor(uint64)": np.dtype(np.uint64),
    "tensor(bool)": np.dtype(np.bool_),
    "tensor(string)": np.dtype(np.object_),
}


def _onnxruntime() -> Any:
    """onnxruntime (untyped; imported when a session is made)."""
    return importlib.import_module("onnxruntime")


def execution_providers(device: Device, device_id: int, available: Sequence[str]) -> list[Provider]:
    """onnxruntime providers for an instance: CUDA on ``device_id`` for a GPU instance when the
    installed onnxruntime offers it (CPU as the fallback for unsupported operators), else CPU."""
    if device == "gpu" and CUDA_PROVIDER in available:
        return [(CUDA_PROVIDER, {"device_id": str(device_id)}), CPU_PROVIDER]
    return [CPU_PROVIDER]


@dataclass(frozen=True)
class TensorInfo:
    """One input of the ONNX graph: its numpy datatype and shape (None: a free dimension)."""

    name: str
    dtype: np.dtype[Any] | None
    shape: tuple[int | None, ...]

    @property
    def batched(self) -> bool:
        """Whether the first dimension is free (rows of several requests can be stacked)."""
        return bool(self.shape) and self.shape[0] is None


def _dimension(value: Any) -> int | None:
    return value if isinstance(value, int) and value >= 0 else None


class OnnxSession:
    """An onnxruntime session on one ONNX file, checking inputs before running them.

    ``path`` is the ``.onnx`` file (or a folder holding ``model.onnx`` and its external data, as
    Triton accepts). ``device`` "gpu" uses CUDA on ``device_id`` when onnxruntime offers it.
    """

    def __init__(
        self,
        path: Path | str,
        device: Device = "cpu",
        device_id: int = 0,
        *,
        intra_op_threads: int = 0,
        inter_op_threads: int = 0,
    ) -> None:
        ort = _onnxruntime()
        onnx_path = Path(path)
        if onnx_path.is_dir():
            onnx_path = onnx_path / DEFAULT_ONNX_FILE
        options = ort.SessionOptions()
        if intra_op_threads > 0:
            options.intra_op_num_threads = intra_op_threads
        if inter_op_threads > 0:
            options.inter_op_num_threads = inter_op_threads
        self.path = onnx_path
        self.providers = execution_providers(device, device_id, ort.get_available_providers())
        self._session: Any = ort.InferenceSession(
            str(onnx_path), sess_options=options, providers=self.providers
        )
        self.inputs: dict[str, TensorInfo] = {
            i.name: TensorInfo(
                i.name, ORT_DTYPES.get(i.type), tuple(_dimension(d) for d in i.shape)
            )
            for i in self._session.get_inputs()
        }
        self.outputs: tuple[str, ...] = tuple(o.name for o in self._session.get_outputs())

    @property
    def provider(self) -> str:
        """The execution provider the session runs on first (CUDAExecutionProvider or CPU)."""
        providers: list[str] = self._session.get_providers()
        return providers[0]

    @property
    def batched(self) -> bool:
        """Whether every input's first dimension is free (requests can be stacked on it)."""
        return bool(self.inputs) and all(info.batched for info in self.inputs.values())

    def check(self, inputs: Mapping[str, Array], *, same_rows: bool = False) -> dict[str, Array]:
        """The inputs as onnxruntime takes them; ValueError naming what does not fit the graph
        (a missing or unknown input, a datatype, a rank, a fixed dimension), or, with
        ``same_rows`` (a batching model), inputs whose first dimensions differ."""
        missing = sorted(set(self.inputs) - set(inputs))
        unknown = sorted(set(inputs) - set(self.inputs))
        if missing or unknown:
            raise ValueError(
                f"inputs {sorted(inputs)} do not match the model's {sorted(self.inputs)}"
                + (f": missing {missing}" if missing else "")
                + (f": unknown {unknown}" if unknown else "")
            )
        checked: dict[str, Array] = {}
        for name, info in self.inputs.items():
            array = np.asarray(inputs[name])
            if info.dtype is not None and info.dtype.kind == "O":
                array = np.vectorize(_text, otypes=[object])(array) if array.size else array
            elif info.dtype is not None and array.dtype != info.dtype:
                raise ValueError(f"input {name} must be {info.dtype}, got {array.dtype}")
            if array.ndim != len(info.shape):
                raise ValueError(
                    f"input {name} must have {len(info.shape)} dimensions "
                    f"{_shape_text(info.shape)}, got shape {list(array.shape)}"
                )
            for axis, (want, got) in enumerate(zip(info.shape, array.shape, strict=True)):
                if want is not None and want != got:
                    raise ValueError(
                        f"input {name} must have shape {_shape_text(info.shape)}, got "
                        f"{list(array.shape)} (dimension {axis} is {got}, not {want})"
                    )
            checked[name] = np.ascontiguousarray(array)
        if same_rows and len({a.shape[0] for a in checked.values()}) > 1:
            rows = {name: a.shape[0] for name, a in checked.items()}
            raise ValueError(f"inputs have different numbers of rows: {rows}")
        return checked

    def run(
        self, inputs: Mapping[str, Array], outputs: Sequence[str] | None = None
    ) -> dict[str, Array]:
        """Check and run the inputs; the named outputs (all when None), by name."""
        names = list(outputs) if outputs is not None else list(self.outputs)
        unknown = sorted(set(names) - set(self.outputs))
        if unknown:
            raise ValueError(f"the model has no outputs {unknown} (it has {list(self.outputs)})")
        results = self._session.run(names, self.check(inputs))
        return {name: np.asarray(value) for name, value in zip(names, results, strict=True)}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _shape_text(shape: tuple[int | None, ...]) -> str:
    return "[" + ", ".join("n" if d is None else str(d) for d in shape) + "]"


def _run_one(
    session: OnnxSession, inputs: Mapping[str, Array], outputs: Sequence[str]
) -> dict[str, Array] | Exception:
    try:
        return session.run(inputs, outputs)
    except ValueError as exc:
        return exc
    except Exception as exc:  # noqa: BLE001 -- onnxruntime's errors become this request's error
        return RuntimeError(f"onnxruntime failed: {exc}")


def run_requests(
    session: OnnxSession,
    requests: Sequence[Mapping[str, Array]],
    outputs: Sequence[str],
    *,
    batching: bool = True,
) -> list[dict[str, Array] | Exception]:
    """Each request's outputs, or the error that request gets.

    With ``batching`` (a model with ``max_batch_size`` > 0 and a free first dimension), requests
    whose inputs agree in datatype and in every dimension but the first run as one session run,
    and the outputs are split back by each request's rows. Should that run fail, or give outputs
    that are not one row per input row, the group's requests run one by one, so that one bad
    request fails alone.
    """
    results: list[dict[str, Array] | Exception | None] = [None] * len(requests)
    checked: dict[int, dict[str, Array]] = {}
    groups: dict[tuple[Any, ...], list[int]] = {}
    stack = batching and session.batched
    for i, request in enumerate(requests):
        try:
            checked[i] = session.check(request, same_rows=stack)
        except ValueError as exc:
            results[i] = exc
            continue
        key: tuple[Any, ...] = (
            tuple((n, a.dtype.str, a.shape[1:]) for n, a in sorted(checked[i].items()))
            if stack
            else ("alone", i)
        )
        groups.setdefault(key, []).append(i)
    for members in groups.values():
        if len(members) > 1:
            split = _run_stacked(session, [checked[i] for i in members], outputs)
            if split is not None:
                for i, result in zip(members, split, strict=True):
                    results[i] = result
                continue
        for i in members:
            results[i] = _run_one(session, checked[i], outputs)
    return [r if r is not None else RuntimeError("request was not run") for r in results]


def _run_stacked(
    session: OnnxSession, requests: list[dict[str, Array]], outputs: Sequence[str]
) -> list[dict[str, Array]] | None:
    """One run over the stacked rows of ``requests``, split back; None when that cannot be."""
    rows = [next(iter(r.values())).shape[0] for r in requests]
    stacked = {name: np.concatenate([r[name] for r in requests]) for name in requests[0]}
    result = _run_one(session, stacked, outputs)
    total = sum(rows)
    if isinstance(result, Exception) or any(
        a.ndim == 0 or a.shape[0] != total for a in result.values()
    ):
        return None
    bounds = np.cumsum(rows)[:-1]
    pieces = {name: np.split(array, bounds) for name, array in result.items()}
    return [{name: pieces[name][k] for name in result} for k in range(len(requests))]


def _pb_utils() -> Any:
    """Triton's python backend utilities; only present inside the Triton python backend."""
    return importlib.import_module("triton_python_backend_utils")


def _parameters(config: Mapping[str, Any]) -> dict[str, str]:
    raw: Mapping[str, Any] = config.get("parameters") or {}
    return {key: str(value.get("string_value", "")) for key, value in raw.items()}


def _count(text: str | None) -> int:
    try:
        return max(0, int(text or 0))
    except ValueError:
        return 0


class TritonPythonModel:
    """Triton entry point: the version's ONNX file on onnxruntime, one response per request."""

    def initialize(self, args: dict[str, str]) -> None:
        """Open the ONNX file of this version on the instance's device."""
        self.pb = _pb_utils()
        config: dict[str, Any] = json.loads(args["model_config"])
        parameters = _parameters(config)
        filename = parameters.get(ONNX_FILE_PARAMETER) or DEFAULT_ONNX_FILE
        path = Path(args["model_repository"]) / args["model_version"] / filename
        device: Device = "gpu" if args.get("model_instance_kind") == "GPU" else "cpu"
        self.session = OnnxSession(
            path,
            device,
            _count(args.get("model_instance_device_id")),
            intra_op_threads=_count(parameters.get(INTRA_OP_THREADS_PARAMETER)),
            inter_op_threads=_count(parameters.get(INTER_OP_THREADS_PARAMETER)),
        )
        self.batching = int(config.get("max_batch_size", 0)) > 0
        self.inputs = [str(i["name"]) for i in config.get("input", [])] or list(self.session.inputs)
        self.outputs = [str(o["name"]) for o in config.get("output", [])] or list(
            self.session.outputs
        )
        # A config naming tensors the graph lacks fails the load, as Triton's onnxruntime backend
        # fails it, rather than every request.
        for kind, declared, graph in (
            ("inputs", self.inputs, list(self.session.inputs)),
            ("outputs", self.outputs, list(self.session.outputs)),
        ):
            if sorted(set(declared) - set(graph)):
                raise ValueError(
                    f"config.pbtxt declares {kind} {sorted(set(declared) - set(graph))} that "
                    f"{path.name} does not have (it has {graph})"
                )
        self.pb.Logger.log_info(
            f"{args.get('model_instance_name', config.get('name'))}: {path.name} on "
            f"{self.session.provider} (instance kind {args.get('model_instance_kind', 'CPU')})"
        )

    def execute(self, requests: list[Any]) -> list[Any]:
        """Run all requests of this call as one batch where they stack; errors per request."""
        pb = self.pb
        arrays: list[dict[str, Array]] = []
        for request in requests:
            found = {n: pb.get_input_tensor_by_name(request, n) for n in self.inputs}
            arrays.append({n: t.as_numpy() for n, t in found.items() if t is not None})
        responses: list[Any] = []
        for result in run_requests(self.session, arrays, self.outputs, batching=self.batching):
            if isinstance(result, Exception):
                responses.append(
                    pb.InferenceResponse(output_tensors=[], error=pb.TritonError(str(result)))
                )
            else:
                tensors = [pb.Tensor(name, _for_triton(result[name])) for name in self.outputs]
                responses.append(pb.InferenceResponse(output_tensors=tensors))
        return responses

    def finalize(self) -> None:
        """Release the session."""
        del self.session


def _for_triton(array: Array) -> Array:
    """String outputs as bytes objects (Triton's BYTES); others unchanged."""
    if array.dtype.kind in "OU" and array.size:
        encoded: Array = np.vectorize(_bytes, otypes=[object])(array)
        return encoded
    return array


def _bytes(value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()
