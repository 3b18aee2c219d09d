"""Start the real NVIDIA Triton server of the nvidia-pytriton wheel on a model repository.

The wheel ships ``pytriton/tritonserver/bin/tritonserver`` (Triton 2.51) with the python backend.
Two traps make it fail when started naively, both handled here:

- the python backend needs ``triton_python_backend_stub`` for the running Python beside
  ``libtriton_python.so``; the wheel keeps the stubs apart (``python_backend_stubs/3.11/``), so a
  backend directory is assembled under a cache directory (site-packages is never modified);
- the stub links ``libpython3.11.so.1.0`` and would pick the system one first, so the running
  interpreter's ``LIBDIR`` goes first on ``LD_LIBRARY_PATH`` (else models fail with
  ``'_thread.RLock' object has no attribute '_recursion_count'``). The copied backend library and
  stub lose their ``$ORIGIN``-relative RPATH to the wheel's ``nvidia_pytriton.libs`` (libarchive,
  libcudart), so that directory goes on ``LD_LIBRARY_PATH`` too.

The running virtualenv's ``bin`` goes first on ``PATH``, so python models import its packages.

The server serves a rendered copy of the repository (``render_model_repository``, in
medmesh_cli.devstack.model_repository): the same repository as in NVIDIA's container, with
``instance_group`` rewritten to one ``KIND_GPU`` instance per GPU where GPUs exist, and each ONNX
model (platform ``onnxruntime_onnx``, which this tritonserver cannot load) written as a
python-backend model running ``medmesh_cli.devstack.onnx_runner`` on the same ``model.onnx``.

Models are under explicit control (``--model-control-mode=explicit --load-model=*``): all are
loaded at start, and ``load_model`` / ``unload_model`` (Triton's repository API,
``POST /v2/repository/models/<name>/load|unload``) add, reload and remove models while the server
runs; ``TritonServer.render_model`` first renders a new or changed model folder into the served
repository.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Literal, Self
from urllib.parse import quote

import httpx

from medmesh_cli.devstack.model_repository import (
    render_config,
    render_model_repository,
    repository_models,
    served_versions,
)
from medmesh_cli.devstack.model_repository import render_model as render_model_folder
from medmesh_cli.devstack.paths import cache_dir as medmesh_cache_dir

__all__ = [
    "DEFAULT_LOAD_TIMEOUT_S",
    "DEFAULT_STARTUP_TIMEOUT_S",
    "DEFAULT_STOP_GRACE_S",
    "DEFAULT_UNLOAD_TIMEOUT_S",
    "GpuDetection",
    "TritonPorts",
    "TritonServer",
    "detect_gpu_count",
    "detect_gpus",
    "is_model_ready",
    "load_model",
    "nvml_gpu_count",
    "port_in_use",
    "prepare_backend_directory",
    "pytriton_directory",
    "render_config",  # the repository helpers, re-exported from model_repository
    "render_model_repository",
    "repository_models",
    "served_versions",
    "smi_gpu_count",
    "triton_environment",
    "tritonserver_binary",
    "unload_model",
]

DEFAULT_STARTUP_TIMEOUT_S = 120.0
DEFAULT_STOP_GRACE_S = 15.0
DEFAULT_LOAD_TIMEOUT_S = 120.0
DEFAULT_UNLOAD_TIMEOUT_S = 60.0
LOG_TAIL_LINES = 60
_COMPLETE_MARKER = ".complete"


@dataclass(frozen=True)
class TritonPorts:
    """The three ports Triton listens on."""

    http: int = 8000
    grpc: int = 8001
    metrics: int = 8002


# --- locating the wheel's Triton ---------------------------------------------------------------


def pytriton_directory() -> Path:
    """The installed ``pytriton`` package folder (not imported: importing pytriton is slow)."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the nvidia-pytriton wheel is not installed in this environment "
            f"({sys.prefix}); it ships the tritonserver binary (uv sync --group dev)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def tritonserver_binary() -> Path:
    """Path of the ``tritonserver`` executable shipped in the nvidia-pytriton wheel."""
    binary = pytriton_directory() / "tritonserver" / "bin" / "tritonserver"
    if not binary.is_file():
        raise RuntimeError(f"nvidia-pytriton is installed but has no {binary}")
    return binary


def _python_tag() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def prepare_backend_directory(cache_dir: Path | None = None) -> Path:
    """A Triton ``--backend-directory`` whose ``python/`` holds the backend and the stub.

    Copies ``pytriton/tritonserver/backends/python`` and the stub for the running Python
    (``python_backend_stubs/<major.minor>/triton_python_backend_stub``) into
    ``<cache_dir>/pytriton-<version>-py<major.minor>/python``. Reused when already complete;
    assembled in a temporary folder and renamed into place, so concurrent callers are safe.
    """
    cache = (cache_dir or medmesh_cache_dir() / "triton-backends").expanduser()
    server = pytriton_directory() / "tritonserver"
    stub = server / "python_backend_stubs" / _python_tag() / "triton_python_backend_stub"
    if not stub.is_file():
        raise RuntimeError(f"nvidia-pytriton has no python backend stub for Python {_python_tag()}")
    version = importlib.metadata.version("nvidia-pytriton")
    target = cache / f"pytriton-{version}-py{_python_tag()}"
    if (target / _COMPLETE_MARKER).is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=cache))
    try:
        shutil.copytree(server / "backends" / "python", staging / "python")
        shutil.copy2(stub, staging / "python" / stub.name)
        (staging / _COMPLETE_MARKER).write_text(f"nvidia-pytriton {version}\n")
        if target.exists():  # an incomplete leftover of an interrupted run
            shutil.rmtree(target, ignore_errors=True)
        try:
            staging.rename(target)
        except OSError:
            if not (target / _COMPLETE_MARKER).is_file():  # lost the race to a complete copy?
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _venv_bin() -> Path:
    """The ``bin`` folder of the running (virtual) environment."""
    if sys.prefix != sys.base_prefix:
        return Path(sys.prefix) / "bin"
    return Path(sys.executable).parent


def triton_environment(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for tritonserver: the interpreter's LIBDIR and the wheel's libs, venv on PATH."""
    env = dict(os.environ if base is None else base)
    libdirs: list[str] = []
    libdir = sysconfig.get_config_var("LIBDIR")
    if isinstance(libdir, str) and libdir:
        libdirs.append(libdir)
    wheel_libs = pytriton_directory().parent / "nvidia_pytriton.libs"
    if wheel_libs.is_dir():
        libdirs.append(str(wheel_libs))
    if env.get("LD_LIBRARY_PATH"):
        libdirs.append(env["LD_LIBRARY_PATH"])
    env["LD_LIBRARY_PATH"] = os.pathsep.join(libdirs)
    env["PATH"] = os.pathsep.join(p for p in (str(_venv_bin()), env.get("PATH", "")) if p)
    return env


def nvml_gpu_count() -> int | None:
    """Number of GPUs NVML (nvidia-ml-py) reports; None when NVML or the driver is unavailable."""
    try:
        nvml: Any = importlib.import_module("pynvml")  # untyped; imported only when detecting
    except ImportError:
        return None
    try:
        nvml.nvmlInit()
    except nvml.NVMLError:  # no driver, no libnvidia-ml.so: this host has no usable GPU via NVML
        return None
    try:
        return int(nvml.nvmlDeviceGetCount())
    except nvml.NVMLError:
        return None
    finally:
        with contextlib.suppress(nvml.NVMLError):
            nvml.nvmlShutdown()


def smi_gpu_count() -> int:
    """Number of NVIDIA GPUs ``nvidia-smi -L`` lists; 0 without the tool or a driver."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return 0
    try:
        listing = subprocess.run(
            [smi, "-L"], capture_output=True, text=True, timeout=20, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in listing.splitlines() if line.startswith("GPU "))


@dataclass(frozen=True)
class GpuDetection:
    """How many GPUs this host has for Triton, and who said so."""

    count: int
    source: Literal["env", "nvml", "nvidia-smi"]


def detect_gpus(
    env: Mapping[str, str] | None = None,
    nvml: Callable[[], int | None] = nvml_gpu_count,
    smi: Callable[[], int] = smi_gpu_count,
) -> GpuDetection:
    """GPUs for Triton: ``MEDMESH_GPU_COUNT`` when set (0 forces CPU), else NVML, else nvidia-smi."""
    forced = (os.environ if env is None else env).get("MEDMESH_GPU_COUNT", "").strip()
    if forced:
        return GpuDetection(max(0, int(forced)), "env")
    count = nvml()
    if count is not None:
        return GpuDetection(count, "nvml")
    return GpuDetection(smi(), "nvidia-smi")


def detect_gpu_count() -> int:
    """Number of GPUs Triton should use on this host (see ``detect_gpus``)."""
    return detect_gpus().count


def port_in_use(host: str, port: int) -> bool:
    """Whether a listening socket already holds ``host:port``.

    Triton binds its ports with SO_REUSEPORT, so a second tritonserver on a busy port starts
    "successfully" and shares the port with the first (answering for it): check before starting.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return True
    return False


# --- the repository API (explicit model control) ----------------------------------------------


def _triton_error(response: httpx.Response) -> str:
    """Triton's error message in a failed answer (its JSON ``error``, else the body)."""
    try:
        body = response.json()
    except ValueError:
        return response.text.strip() or f"HTTP {response.status_code}"
    return str(body.get("error", body)) if isinstance(body, dict) else str(body)


def is_model_ready(http_url: str, name: str, version: int | None = None) -> bool:
    """Whether Triton at ``http_url`` (``host:port``) has ``name`` (that version) ready."""
    path = f"/v2/models/{quote(name, safe='')}"
    if version is not None:
        path += f"/versions/{version}"
    try:
        return httpx.get(f"http://{http_url}{path}/ready", timeout=5.0).status_code == 200
    except httpx.HTTPError:
        return False


def load_model(http_url: str, name: str, *, timeout_s: float = DEFAULT_LOAD_TIMEOUT_S) -> None:
    """Load, or load again, the model ``name`` of the repository Triton at ``http_url`` serves.

    ``POST /v2/repository/models/<name>/load`` (Triton started with
    ``--model-control-mode=explicit``): Triton reads the model's config.pbtxt and version
    folders again, so a model loaded before serves a version folder added since, and stops
    serving versions its policy no longer names; other models are untouched. Triton answers once
    the load is done; RuntimeError with Triton's reason when it failed.
    """
    url = f"http://{http_url}/v2/repository/models/{quote(name, safe='')}/load"
    try:
        response = httpx.post(url, json={}, timeout=timeout_s)
    except httpx.HTTPError as exc:
        raise RuntimeError(
            f"Triton at {http_url} did not answer the load of {name}: {exc}"
        ) from exc
    if response.status_code != 200:
        raise RuntimeError(f"Triton could not load model {name}: {_triton_error(response)}")


def unload_model(http_url: str, name: str, *, timeout_s: float = DEFAULT_UNLOAD_TIMEOUT_S) -> None:
    """Unload the model ``name`` (every version) from Triton at ``http_url``.

    ``POST /v2/repository/models/<name>/unload``; returns once Triton no longer reports the model
    ready (in-flight requests finish first), RuntimeError when Triton refuses or takes longer
    than ``timeout_s``. The server keeps running, and the model can be loaded again.
    """
    url = f"http://{http_url}/v2/repository/models/{quote(name, safe='')}/unload"
    deadline = time.monotonic() + timeout_s
    try:
        response = httpx.post(url, json={}, timeout=timeout_s)
    except httpx.HTTPError as exc:
        raise RuntimeError(
            f"Triton at {http_url} did not answer the unload of {name}: {exc}"
        ) from exc
    if response.status_code != 200:
        raise RuntimeError(f"Triton could not unload model {name}: {_triton_error(response)}")
    while is_model_ready(http_url, name):
        if time.monotonic() > deadline:
            raise RuntimeError(f"model {name} was still ready {timeout_s:.0f} s after its unload")
        time.sleep(0.1)


# --- the server --------------------------------------------------------------------------------

LogTarget = Path | IO[Any] | int | None


class TritonServer:
    """A ``tritonserver`` subprocess serving a rendered copy of a model repository.

    ``log`` receives Triton's stdout and stderr: a file path (appended to), an open file, a
    file descriptor, ``subprocess.PIPE`` (kept in memory, see ``log_tail``), or None for a file
    in the server's work folder. ``start`` returns once the server and every served version of
    every model is ready, and raises RuntimeError with the end of Triton's log when the server
    exits or is not ready within ``startup_timeout_s``.
    """

    def __init__(
        self,
        model_repository: Path,
        *,
        ports: TritonPorts | None = None,
        host: str = "127.0.0.1",
        gpu_count: int = 0,
        log: LogTarget = None,
        backend_cache_dir: Path | None = None,
        work_dir: Path | None = None,
        startup_timeout_s: float = DEFAULT_STARTUP_TIMEOUT_S,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.model_repository = Path(model_repository)
        self.ports = ports or TritonPorts()
        self.host = host
        self.gpu_count = gpu_count
        self.backend_cache_dir = backend_cache_dir
        self.startup_timeout_s = startup_timeout_s
        self.extra_args = extra_args
        self._log_target = log
        self._work_dir = work_dir
        self._owns_work_dir = False
        self._process: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None
        self._log_path: Path | None = None
        self._pipe_lines: deque[str] = deque(maxlen=2000)
        self._pipe_reader: threading.Thread | None = None
        self.served_repository: Path | None = None
        # Models rendered from folders outside model_repository (render_model's source): rendered
        # again, with the repository, whenever this server starts.
        self.added_models: dict[str, Path] = {}

    # addresses

    @property
    def http_url(self) -> str:
        """``host:port`` of the HTTP endpoint (tritonclient.http form)."""
        return f"{self.host}:{self.ports.http}"

    @property
    def grpc_url(self) -> str:
        """``host:port`` of the gRPC endpoint (tritonclient.grpc form)."""
        return f"{self.host}:{self.ports.grpc}"

    @property
    def metrics_url(self) -> str:
        """Prometheus metrics URL."""
        return f"http://{self.host}:{self.ports.metrics}/metrics"

    @property
    def pid(self) -> int | None:
        """Process id of tritonserver while it runs."""
        return self._process.pid if self._process else None

    # lifecycle

    def command(self, repository: Path, backend_directory: Path) -> list[str]:
        """The tritonserver command line."""
        return [
            str(tritonserver_binary()),
            f"--model-repository={repository}",
            f"--backend-directory={backend_directory}",
            f"--http-address={self.host}",
            f"--http-port={self.ports.http}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.ports.grpc}",
            f"--metrics-address={self.host}",
            f"--metrics-port={self.ports.metrics}",
            # Explicit model control: every model of the repository is loaded at start (as with
            # "none"), and models are loaded and unloaded later through the repository API.
            "--model-control-mode=explicit",
            "--load-model=*",
            "--exit-on-error=true",
            *self.extra_args,
        ]

    def start(self) -> Self:
        """Render the repository, start tritonserver and wait until every model is ready."""
        if self._process is not None:
            raise RuntimeError("this TritonServer is already started")
        if not self.model_repository.is_dir():
            raise RuntimeError(f"model repository {self.model_repository} is not a folder")
        ports = (self.ports.http, self.ports.grpc, self.ports.metrics)
        busy = [port for port in ports if port_in_use(self.host, port)]
        if busy:
            raise RuntimeError(
                f"Triton: port(s) {busy} on {self.host} are already in use; is another "
                "tritonserver (another medmesh stack) running? Choose other ports."
            )
        backend_directory = prepare_backend_directory(self.backend_cache_dir)
        if self._work_dir is None:
            self._work_dir = Path(tempfile.mkdtemp(prefix="medmesh-triton-"))
            self._owns_work_dir = True
        rendered = self._work_dir / "model-repository"
        if rendered.exists():  # our own output of an earlier start in the same work folder
            shutil.rmtree(rendered)
        self.served_repository = render_model_repository(
            self.model_repository, rendered, self.gpu_count
        )
        for source in self.added_models.values():
            render_model_folder(source, rendered, self.gpu_count)
        stdout = self._open_log()
        try:
            self._process = subprocess.Popen(
                self.command(self.served_repository, backend_directory),
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=subprocess.STDOUT,
                env=triton_environment(),
            )
        except OSError:
            self._close_log()
            raise
        if stdout == subprocess.PIPE:
            self._start_pipe_reader()
        try:
            self.wait_until_ready(self.startup_timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_until_ready(self, timeout_s: float) -> None:
        """Block until the server and all served model versions are ready; RuntimeError if not."""
        import tritonclient.http as triton_http  # noqa: PLC0415 (slow import, only when used)
        from tritonclient.utils import InferenceServerException  # noqa: PLC0415

        process = self._process
        if process is None or self.served_repository is None:
            raise RuntimeError("TritonServer.start() was not called")
        expected = repository_models(self.served_repository)
        deadline = time.monotonic() + timeout_s
        client = triton_http.InferenceServerClient(
            self.http_url, connection_timeout=2.0, network_timeout=5.0
        )
        waiting = "the server"
        try:
            while True:
                if process.poll() is not None:
                    if self._pipe_reader is not None:
                        self._pipe_reader.join(timeout=5)  # let the reader catch the last lines
                    raise RuntimeError(
                        f"tritonserver exited with code {process.returncode} before it was ready "
                        f"(waiting for {waiting}).\n--- end of Triton's log ---\n{self.log_tail()}"
                    )
                try:
                    waiting = self._not_ready(client, expected)
                except (OSError, InferenceServerException):
                    waiting = "the server"
                if not waiting:
                    return
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"tritonserver was not ready within {timeout_s:.0f} s (waiting for "
                        f"{waiting}).\n--- end of Triton's log ---\n{self.log_tail()}"
                    )
                time.sleep(0.2)
        finally:
            client.close()

    @staticmethod
    def _not_ready(client: Any, expected: Mapping[str, list[int]]) -> str:
        """What is not ready yet ('' when all is)."""
        if not client.is_server_live() or not client.is_server_ready():
            return "the server"
        for model, versions in expected.items():
            for version in versions:
                if not client.is_model_ready(model, str(version)):
                    return f"model {model} version {version}"
        return ""

    # models at run time (explicit model control)

    def render_model(self, name: str, *, source: Path | None = None) -> Path:
        """Render one model folder into the repository this server serves, for a later load.

        ``source`` is the model folder (default ``<model_repository>/<name>``): a new model, or a
        model with a new version folder or config. It replaces the rendered folder of ``name``
        (models served now keep running); ``load_model(name)`` then serves it. A ``source``
        outside the model repository is remembered and rendered again when the server restarts.
        """
        if self.served_repository is None:
            raise RuntimeError("TritonServer.start() was not called")
        folder = Path(source) if source is not None else self.model_repository / name
        if folder.name != name:
            raise ValueError(f"the folder of model {name} must be named {name}, not {folder.name}")
        rendered = render_model_folder(folder, self.served_repository, self.gpu_count)
        if source is not None:
            self.added_models[name] = folder
        return rendered

    def load_model(self, name: str, *, timeout_s: float = DEFAULT_LOAD_TIMEOUT_S) -> list[int]:
        """Load (or load again) ``name`` from the served repository; the versions it serves.

        Raises RuntimeError, with the end of Triton's log, when the load fails or a version the
        model's policy serves is not ready after it.
        """
        if not self.is_running() or self.served_repository is None:
            raise RuntimeError("tritonserver is not running")
        try:
            load_model(self.http_url, name, timeout_s=timeout_s)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}\n--- end of Triton's log ---\n{self.log_tail()}") from exc
        versions = served_versions(self.served_repository / name)
        missing = [v for v in versions if not is_model_ready(self.http_url, name, v)]
        if missing:
            raise RuntimeError(
                f"model {name} loaded, but versions {missing} are not ready.\n"
                f"--- end of Triton's log ---\n{self.log_tail()}"
            )
        return versions

    def unload_model(self, name: str, *, timeout_s: float = DEFAULT_UNLOAD_TIMEOUT_S) -> None:
        """Unload every version of ``name``; the server and the other models keep running."""
        if not self.is_running():
            raise RuntimeError("tritonserver is not running")
        unload_model(self.http_url, name, timeout_s=timeout_s)

    def is_running(self) -> bool:
        """Whether the tritonserver process is alive."""
        return self._process is not None and self._process.poll() is None

    def stop(self, grace_s: float = DEFAULT_STOP_GRACE_S) -> int | None:
        """Terminate tritonserver (SIGTERM), kill it after ``grace_s``; its exit code. The
        process is forgotten only once it has exited, so a stop cut short (a KeyboardInterrupt)
        and called again still stops it."""
        process = self._process
        code: int | None = None
        if process is not None:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=grace_s)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            code = process.returncode
            self._process = None
        if self._pipe_reader is not None:
            self._pipe_reader.join(timeout=5)
            self._pipe_reader = None
        self._close_log()
        if self._owns_work_dir and self._work_dir is not None:
            shutil.rmtree(self._work_dir, ignore_errors=True)
            self._work_dir = None
            self._owns_work_dir = False
            self._log_path = None
        return code

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # the log

    def _open_log(self) -> IO[Any] | int:
        """What the subprocess writes to; remembers where the log can be read back."""
        target = self._log_target
        if target is None:
            assert self._work_dir is not None  # noqa: S101 (set by start)
            target = self._work_dir / "tritonserver.log"
        if isinstance(target, Path):
            target.parent.mkdir(parents=True, exist_ok=True)
            self._log_file = target.open("ab")
            self._log_path = target
            return self._log_file
        if isinstance(target, int):
            return target
        name = getattr(target, "name", None)
        if isinstance(name, str) and Path(name).is_file():
            self._log_path = Path(name)
        return target

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def _start_pipe_reader(self) -> None:
        process = self._process
        if process is None or process.stdout is None:
            raise RuntimeError("tritonserver was not started with a pipe")
        stream = process.stdout

        def drain() -> None:
            for raw in stream:
                self._pipe_lines.append(raw.decode(errors="replace").rstrip("\n"))
            stream.close()

        self._pipe_reader = threading.Thread(target=drain, name="tritonserver-log", daemon=True)
        self._pipe_reader.start()

    @property
    def log_path(self) -> Path | None:
        """The file Triton's output goes to, when it is a file."""
        return self._log_path

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The last ``lines`` lines Triton wrote (when its log is a file or a pipe)."""
        if self._log_file is not None:
            self._log_file.flush()
        if self._log_path is not None and self._log_path.is_file():
            with self._log_path.open("rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 256 * 1024))
                text = f.read().decode(errors="replace")
            return "\n".join(text.splitlines()[-lines:])
        if self._pipe_lines:
            return "\n".join(list(self._pipe_lines)[-lines:])
        return "(Triton's output went to a stream medmesh cannot read back)"
