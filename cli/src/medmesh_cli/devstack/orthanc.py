"""A real PACS for the local stack and the end-to-end tests: Orthanc with its DICOMweb plugin.

Orthanc comes from the Debian packages ``orthanc`` and ``orthanc-dicomweb`` (``make deps``
installs them when it runs as root with apt-get; otherwise it says how to get them). The stack
never uses the packages' own system service or its /etc/orthanc configuration: it starts its own
``Orthanc`` process with a configuration written under the stack's state folder, storage in that
folder (wiped on every start, like Kafka's), HTTP on the stack's port, and only DICOMweb
(QIDO-RS, WADO-RS, STOW-RS under /dicom-web/) switched on besides Orthanc's own REST API.

Loopback only: Orthanc 1.10 has no option to bind its HTTP server to one address, so
``RemoteAccessAllowed: false`` makes it refuse every request that does not come from loopback
(403), and the DICOM (DIMSE) listener, which could neither be bound to loopback nor refuse remote
C-STOREs without a list of modalities, is switched off: the stack speaks DICOMweb only.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from medmesh_cli.devstack.apt import AptInstallError, apt_install
from medmesh_cli.devstack.process import ManagedProcess, wait_until

DEBIAN_PACKAGES = ("orthanc", "orthanc-dicomweb")
BINARY_VARIABLE = "MEDMESH_ORTHANC_BINARY"
PLUGIN_VARIABLE = "MEDMESH_ORTHANC_DICOMWEB_PLUGIN"
# Where Debian and Ubuntu put the binary (in sbin: not on a normal user's PATH) and the plugin.
BINARY_CANDIDATES = (Path("/usr/sbin/Orthanc"), Path("/usr/local/sbin/Orthanc"))
PLUGIN_CANDIDATES = (
    Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so"),
    Path("/usr/local/share/orthanc/plugins/libOrthancDicomWeb.so"),
)
PLUGIN_GLOBS = ("/usr/lib/orthanc/libOrthancDicomWeb.so*", "/usr/local/lib/libOrthancDicomWeb.so*")
DICOMWEB_ROOT = "/dicom-web/"


class OrthancMissingError(RuntimeError):
    """Orthanc or its DICOMweb plugin is not installed; the message says how to get them."""


def install_hint() -> str:
    """How to get Orthanc and the DICOMweb plugin on a machine that has neither."""
    return (
        "Orthanc (the local PACS) and its DICOMweb plugin are needed by the local stack and the "
        "tests. On Debian or Ubuntu run as root:\n"
        "  apt-get install -y --no-install-recommends orthanc orthanc-dicomweb\n"
        "(`make deps` does this itself when run as root). Elsewhere install Orthanc 1.10 or "
        f"later and its DICOMweb plugin and set {BINARY_VARIABLE} to the Orthanc executable and "
        f"{PLUGIN_VARIABLE} to libOrthancDicomWeb.so."
    )


def orthanc_binary() -> Path:
    """The Orthanc executable: $MEDMESH_ORTHANC_BINARY, PATH, then where Debian puts it."""
    override = os.environ.get(BINARY_VARIABLE)
    if override:
        path = Path(override)
        if not path.is_file():
            raise OrthancMissingError(
                f"{BINARY_VARIABLE}={override} is not a file.\n{install_hint()}"
            )
        return path
    found = shutil.which("Orthanc")
    if found:
        return Path(found)
    for candidate in BINARY_CANDIDATES:
        if candidate.is_file():
            return candidate
    raise OrthancMissingError(f"no Orthanc executable found.\n{install_hint()}")


def dicomweb_plugin() -> Path:
    """The DICOMweb plugin's shared library: $MEDMESH_ORTHANC_DICOMWEB_PLUGIN, then the
    folders the Debian package uses."""
    override = os.environ.get(PLUGIN_VARIABLE)
    if override:
        path = Path(override)
        if not path.is_file():
            raise OrthancMissingError(
                f"{PLUGIN_VARIABLE}={override} is not a file.\n{install_hint()}"
            )
        return path
    for candidate in PLUGIN_CANDIDATES:
        if candidate.is_file():
            return candidate
    for pattern in PLUGIN_GLOBS:
        folder = Path(pattern).parent
        matches = sorted(folder.glob(Path(pattern).name)) if folder.is_dir() else []
        if matches:
            return matches[0]
    raise OrthancMissingError(
        f"no Orthanc DICOMweb plugin (libOrthancDicomWeb.so) found.\n{install_hint()}"
    )


def find_orthanc() -> tuple[Path, Path] | None:
    """(binary, plugin) when both are installed, else None."""
    try:
        return orthanc_binary(), dicomweb_plugin()
    except OrthancMissingError:
        return None


def ensure_orthanc() -> tuple[Path, Path]:
    """(binary, plugin), installing the Debian packages first when they are missing and this
    runs as root with apt-get; otherwise OrthancMissingError saying how to get them."""
    found = find_orthanc()
    if found is not None:
        return found
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise OrthancMissingError(
            "Orthanc is missing and this is not root on a machine with apt-get, so it cannot "
            f"be installed here.\n{install_hint()}"
        )
    try:
        # The packages' own service may or may not start (it does not in a container); it never
        # matters: the stack runs its own Orthanc on its own ports, configuration and storage.
        apt_install(DEBIAN_PACKAGES)
    except AptInstallError as exc:
        raise OrthancMissingError(f"{exc}\n{install_hint()}") from exc
    found = find_orthanc()
    if found is None:
        raise OrthancMissingError(
            f"apt-get installed {' '.join(DEBIAN_PACKAGES)} but Orthanc or its plugin is still "
            f"not where expected.\n{install_hint()}"
        )
    return found


@dataclass(frozen=True)
class OrthancConfig:
    """Where the stack's Orthanc listens and keeps its state."""

    state_dir: Path
    http_port: int = 8242
    host: str = "127.0.0.1"
    name: str = "medmesh-pacs"

    @property
    def url(self) -> str:
        """Base URL of Orthanc's REST API."""
        return f"http://{self.host}:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        """Base URL of the DICOMweb API (``{dicomweb_url}/studies`` and so on)."""
        return self.url + DICOMWEB_ROOT.rstrip("/")

    @property
    def storage_dir(self) -> Path:
        """Orthanc's DICOM files and its SQLite index."""
        return self.state_dir / "storage"

    @property
    def config_file(self) -> Path:
        """The configuration Orthanc is started with."""
        return self.state_dir / "orthanc.json"


def render_config(config: OrthancConfig, plugin: Path) -> dict[str, Any]:
    """Orthanc's configuration for the local stack (Orthanc 1.10 option names)."""
    return {
        "Name": config.name,
        "StorageDirectory": str(config.storage_dir),
        "IndexDirectory": str(config.storage_dir),
        "Plugins": [str(plugin)],
        "HttpServerEnabled": True,
        "HttpPort": config.http_port,
        # Orthanc 1.10 listens on every interface and cannot be told otherwise: refuse (403)
        # every HTTP request that does not come from loopback instead.
        "RemoteAccessAllowed": False,
        # Loopback only and synthetic data: no users to configure, as for Kafka and Triton.
        "AuthenticationEnabled": False,
        "SslEnabled": False,
        # A DIMSE listener would accept C-STORE from the whole network (no bind address in
        # 1.10); the stack uses DICOMweb only.
        "DicomServerEnabled": False,
        "WebDavEnabled": False,
        "OrthancExplorerEnabled": False,
        "ExecuteLuaEnabled": False,
        "LuaScripts": [],
        "DicomModalities": {},
        "OrthancPeers": {},
        # Small: the machine is shared with Kafka, Triton and the services.
        "HttpThreadsCount": 8,
        "ConcurrentJobs": 1,
        "SaveJobs": False,
        "StorageCompression": False,
        # The same instance sent twice is one instance (STOW-RS is retried by callers).
        "OverwriteInstances": False,
        # No patient attributes in Orthanc's log (the project's rule for logs).
        "DeidentifyLogs": True,
        "DicomWeb": {
            "Enable": True,
            "Root": DICOMWEB_ROOT,
            # WADO-URI is the older API; WADO-RS is what medmesh uses.
            "EnableWado": False,
        },
    }


def _port_open(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


class OrthancServer:
    """One Orthanc process with the DICOMweb plugin, started with fresh storage."""

    def __init__(self, config: OrthancConfig, echo: bool = False) -> None:
        self.config = config
        self.echo = echo
        self._process: ManagedProcess | None = None

    @property
    def url(self) -> str:
        """Base URL of Orthanc's REST API."""
        return self.config.url

    @property
    def dicomweb_url(self) -> str:
        """Base URL of the DICOMweb API."""
        return self.config.dicomweb_url

    def start(self, timeout_s: float = 60.0) -> None:
        """Empty the storage, write the configuration, start Orthanc, wait until it answers
        and serves DICOMweb. OrthancMissingError when it is not installed."""
        binary, plugin = orthanc_binary(), dicomweb_plugin()
        if _port_open(self.config.host, self.config.http_port):
            raise RuntimeError(
                f"Orthanc: port {self.config.http_port} is already in use; is another medmesh "
                "stack (or the orthanc system service on that port) running?"
            )
        shutil.rmtree(self.config.storage_dir, ignore_errors=True)
        self.config.storage_dir.mkdir(parents=True)
        self.config.config_file.write_text(json.dumps(render_config(self.config, plugin), indent=2))
        self.launch(binary, timeout_s)

    def launch(self, binary: Path | None = None, timeout_s: float = 60.0) -> None:
        """Start Orthanc on its existing storage and configuration; wait until it is ready."""
        log = self.config.state_dir / "orthanc.log"
        if log.exists():
            # Readiness failures quote this run's log only: keep earlier runs' logs beside it.
            log.rename(self.config.state_dir / f"orthanc-{time.time_ns()}.log")
        process = ManagedProcess(
            "orthanc",
            [str(binary or orthanc_binary()), str(self.config.config_file)],
            log,
            echo=self.echo,
        )
        process.start()
        self._process = process

        def ready() -> bool:
            if not process.running():
                raise RuntimeError(
                    f"Orthanc exited with {process.returncode()}:\n{process.log_tail()}"
                )
            return self.is_ready()

        try:
            wait_until("Orthanc and its DICOMweb plugin", ready, timeout_s)
        except TimeoutError as exc:
            raise RuntimeError(f"Orthanc: {exc}\n{process.log_tail()}") from exc

    def is_ready(self) -> bool:
        """Whether Orthanc answers GET /system and has the DICOMweb plugin loaded."""
        try:
            system = httpx.get(f"{self.url}/system", timeout=2.0)
            if system.status_code != 200:
                return False
            plugins = httpx.get(f"{self.url}/plugins", timeout=2.0)
        except httpx.HTTPError:
            return False
        return plugins.status_code == 200 and "dicom-web" in plugins.json()

    @property
    def process(self) -> ManagedProcess:
        """The Orthanc process (for fault-injection tests)."""
        if self._process is None:
            raise RuntimeError("Orthanc is not started")
        return self._process

    def is_running(self) -> bool:
        """Whether the Orthanc process is alive."""
        return self._process is not None and self._process.running()

    def exited(self) -> bool:
        """Whether Orthanc was started and no longer runs (never started: False)."""
        return self._process is not None and not self._process.running()

    def restart(self, down_s: float = 0.0, timeout_s: float = 60.0) -> None:
        """Stop Orthanc, stay down ``down_s`` seconds, start it again with its studies."""
        self.stop()
        time.sleep(down_s)
        self.launch(timeout_s=timeout_s)

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM (Orthanc closes its index cleanly), SIGKILL after ``grace_s``."""
        if self._process is not None:
            self._process.stop(grace_s=grace_s)
