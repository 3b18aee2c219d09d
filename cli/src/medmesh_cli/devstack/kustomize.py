"""kustomize, for the conformance test that compares deploy/k8s's renderer with the real tool.

Debian packages no kustomize (and its kubectl is too old to embed a v5 one), so ``make deps``
builds the pinned release from the Go module proxy with ``go install`` into ~/.cache/medmesh,
like the stack's other tools: a few minutes once, then nothing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from medmesh_cli.devstack.paths import cache_dir

# The newest release whose kustomize/api (v0.21.1) builds with this project's Go (1.26); v5.8.3
# needs a newer Go toolchain.
KUSTOMIZE_VERSION = "v5.8.1"
KUSTOMIZE_MODULE = "sigs.k8s.io/kustomize/kustomize/v5"


def kustomize_binary() -> Path:
    """Where the pinned kustomize lives once built (it may not be there yet)."""
    return cache_dir() / f"kustomize-{KUSTOMIZE_VERSION}" / "kustomize"


def install_command() -> str:
    """What builds it, for messages that ask a developer to."""
    return f"make deps (go install {KUSTOMIZE_MODULE}@{KUSTOMIZE_VERSION})"


def ensure_kustomize() -> Path:
    """The pinned kustomize binary, built with ``go install`` on first use."""
    binary = kustomize_binary()
    if binary.is_file():
        return binary
    go = shutil.which("go")
    if go is None:
        raise RuntimeError(
            f"kustomize: 'go' is not on PATH; it is needed once to build kustomize"
            f" {KUSTOMIZE_VERSION} from the Go module proxy"
        )
    # GOBIN: the binary lands in the cache folder, not in the developer's ~/go/bin.
    env = {**os.environ, "GOBIN": str(binary.parent)}
    built = subprocess.run(
        [go, "install", f"{KUSTOMIZE_MODULE}@{KUSTOMIZE_VERSION}"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if built.returncode != 0 or not binary.is_file():
        raise RuntimeError(
            f"kustomize: go install {KUSTOMIZE_MODULE}@{KUSTOMIZE_VERSION} failed:\n"
            f"{built.stdout[-2000:]}{built.stderr[-2000:]}"
        )
    return binary
