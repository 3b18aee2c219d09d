"""Start the real NVIDIA Triton server of the nvidia-pytriton wheel on a model repository.

The wheel ships ``pytriton/tritonserver/bin/tritonserver`` (Triton 2.51) with the python backend.
Two traps make it fail when started naively (BRIEF.md section 6), both handled here:

- the python backend needs ``triton_python_backend_stub`` for the running Python beside
  ``libtriton_python.so``; the wheel keeps the stubs apart (``python_backend_stubs/3.11/``), so a
  backend directory is assembled under a cache directory (site-packages is never modified);
- the stub links ``libpython3.11.so.1.0`` and would pick the system one first, so the running
  interpreter's ``LIBDIR`` goes first on ``LD_LIBRARY_PATH`` (else models fail with
  ``'_thread.RLock' object has no attribute '_recursion_count'``). The copied backend library and
  stub lose their ``$ORIGIN``-relative RPATH to the wheel's ``nvidia_pytriton.libs`` (libarchive,
  libcudart), so that directory goes on ``LD_LIBRARY_PATH`` too.

The running virtualenv's ``bin`` goes first on ``PATH``, so python models import its packages.

The server serves a rendered copy of the repository (``render_model_repository``): the same
repository as in NVIDIA's container, with ``instance_group`` rewritten to one ``KIND_GPU``
instance per GPU where GPUs exist.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import importlib.util
import os
import re
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

from medmesh_cli.devstack.paths import cache_dir as medmesh_cache_dir

DEFAULT_STARTUP_TIMEOUT_S = 120.0
DEFAULT_STOP_GRACE_S = 15.0
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


# --- the model repository ----------------------------------------------------------------------


def _skip_string(text: str, i: int) -> int:
    """Index after the quoted string starting at ``text[i]``."""
    quote = text[i]
    i += 1
    while i < len(text) and text[i] != quote:
        i += 2 if text[i] == "\\" else 1
    return i + 1


def _skip_comment(text: str, i: int) -> int:
    """Index of the end of the line of the comment starting at ``text[i]``."""
    end = text.find("\n", i)
    return len(text) if end < 0 else end


def _matching_close(text: str, i: int) -> int:
    """Index after the bracket that closes the one at ``text[i]`` (strings and comments skipped)."""
    depth = 0
    while i < len(text):
        c = text[i]
        if c in "\"'":
            i = _skip_string(text, i)
            continue
        if c == "#":
            i = _skip_comment(text, i)
            continue
        if c in "[{<":
            depth += 1
        elif c in "]}>":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    raise ValueError("unbalanced brackets in config.pbtxt")


_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _top_level_fields(text: str, field: str) -> list[tuple[int, int]]:
    """Spans of every top-level ``field [..]`` / ``field {..}`` / ``field: {..}`` in a pbtxt."""
    spans: list[tuple[int, int]] = []
    i = 0
    while i < len(text):
        c = text[i]
        if c in "\"'":
            i = _skip_string(text, i)
        elif c == "#":
            i = _skip_comment(text, i)
        elif c in "[{<":
            i = _matching_close(text, i)
        elif match := _IDENT.match(text, i):
            i = match.end()
            if match.group() != field:
                continue
            j = i
            while j < len(text) and (text[j].isspace() or text[j] == ":"):
                j += 1
            if j < len(text) and text[j] in "[{<":
                i = _matching_close(text, j)
                spans.append((match.start(), i))
        else:
            i += 1
    return spans


def gpu_instance_group(gpu_count: int) -> str:
    """pbtxt ``instance_group`` with one KIND_GPU instance on each of ``gpu_count`` GPUs."""
    groups = ",\n".join(
        f"  {{\n    kind: KIND_GPU\n    count: 1\n    gpus: [ {i} ]\n  }}" for i in range(gpu_count)
    )
    return f"instance_group [\n{groups}\n]"


def render_config(text: str, gpu_count: int) -> str:
    """config.pbtxt text for a host with ``gpu_count`` GPUs (unchanged when there are none)."""
    if gpu_count <= 0:
        return text
    spans = _top_level_fields(text, "instance_group")
    block = gpu_instance_group(gpu_count)
    if not spans:
        return text.rstrip() + "\n\n" + block + "\n"
    parts: list[str] = []
    previous = 0
    for n, (start, end) in enumerate(spans):
        parts.append(text[previous:start])
        if n == 0:
            parts.append(block)
        previous = end
    parts.append(text[previous:])
    return "".join(parts)


def render_model_repository(src: Path, dst: Path, gpu_count: int) -> Path:
    """Copy the model repository ``src`` to ``dst`` (new or empty) for ``gpu_count`` GPUs.

    With GPUs, every model's ``instance_group`` becomes one ``KIND_GPU`` instance per GPU
    (``gpus: [ i ]``); without, the configuration is copied as it is (``KIND_CPU``).
    """
    if dst.exists() and any(dst.iterdir()):
        raise FileExistsError(f"{dst} is not empty; render into a new folder")
    shutil.copytree(
        src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"), dirs_exist_ok=True
    )
    for config in sorted(dst.glob("*/config.pbtxt")):
        config.write_text(render_config(config.read_text(), gpu_count))
    return dst


def _strip_comments(text: str) -> str:
    return re.sub(r"#[^\n]*", "", text)


def served_versions(model_dir: Path) -> list[int]:
    """The versions Triton serves from a model folder, by its ``version_policy``.

    Numeric subfolders; ``all`` serves every one, ``specific`` the listed ones, ``latest``
    (Triton's default, ``num_versions`` 1 unless set) the highest.
    """
    present = sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())
    config = _strip_comments((model_dir / "config.pbtxt").read_text())
    policy = re.search(r"version_policy\s*:?\s*\{\s*(all|latest|specific)\b([^}]*)", config)
    if policy is None or policy.group(1) == "latest":
        num = re.search(r"num_versions\s*:\s*(\d+)", policy.group(2)) if policy else None
        return present[-(int(num.group(1)) if num else 1) :]
    if policy.group(1) == "specific":
        listed = {int(v) for v in re.findall(r"\d+", policy.group(2))}
        return [v for v in present if v in listed]
    return present


def repository_models(repository: Path) -> dict[str, list[int]]:
    """Every model of a repository (folders with config.pbtxt) and the versions it serves."""
    return {
        config.parent.name: served_versions(config.parent)
        for config in sorted(repository.glob("*/config.pbtxt"))
    }


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
            "--model-control-mode=none",
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

    def is_running(self) -> bool:
        """Whether the tritonserver process is alive."""
        return self._process is not None and self._process.poll() is None

    def stop(self, grace_s: float = DEFAULT_STOP_GRACE_S) -> int | None:
        """Terminate tritonserver (SIGTERM), kill it after ``grace_s``; its exit code."""
        process, self._process = self._process, None
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
