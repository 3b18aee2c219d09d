"""Installing a Debian package the local stack needs (Orthanc, chromium) when run as root."""

from __future__ import annotations

import os
import subprocess


class AptInstallError(RuntimeError):
    """apt-get could not install the packages; the message carries its output."""


def apt_install(packages: tuple[str, ...]) -> None:
    """apt-get install, non-interactive and without recommends; the package lists are refreshed
    once when the first try fails (a fresh machine may have none)."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    command = ["apt-get", "install", "-y", "--no-install-recommends", *packages]
    first = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if first.returncode == 0:
        return
    update = subprocess.run(
        ["apt-get", "update"], env=env, capture_output=True, text=True, check=False
    )
    second = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if second.returncode != 0:
        raise AptInstallError(
            f"apt-get could not install {' '.join(packages)} (exit {second.returncode}):\n"
            f"{first.stderr[-1500:]}{update.stderr[-1000:]}{second.stdout[-1500:]}"
            f"{second.stderr[-1500:]}"
        )
