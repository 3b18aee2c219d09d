"""Debian's chromium for the console's browser test (tests/e2e/test_console_browser.py).

Playwright drives it as an installed executable: Playwright's own browser downloads are never
used (they come from a CDN, unpinned by the lock). ``make deps`` installs the Debian package when
it runs as root with apt-get, as it does Orthanc; otherwise it says how to get it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from medmesh_cli.devstack.apt import AptInstallError, apt_install

DEBIAN_PACKAGE = "chromium"
BINARY_VARIABLE = "MEDMESH_CHROMIUM_BINARY"
BINARY_CANDIDATES = (Path("/usr/bin/chromium"), Path("/usr/bin/chromium-browser"))


class ChromiumMissingError(RuntimeError):
    """No chromium executable; the message says how to get one."""


def install_hint() -> str:
    """How to get chromium on a machine that has none."""
    return (
        "The console's browser test drives Debian's chromium. On Debian run as root:\n"
        f"  apt-get install -y --no-install-recommends {DEBIAN_PACKAGE}\n"
        "(`make deps` does this itself when run as root). Elsewhere install Chromium and set "
        f"{BINARY_VARIABLE} to its executable."
    )


def chromium_binary() -> Path:
    """The chromium executable: $MEDMESH_CHROMIUM_BINARY, then where Debian puts it."""
    override = os.environ.get(BINARY_VARIABLE)
    if override:
        path = Path(override)
        if not path.is_file():
            raise ChromiumMissingError(
                f"{BINARY_VARIABLE}={override} is not a file.\n{install_hint()}"
            )
        return path
    for candidate in BINARY_CANDIDATES:
        if candidate.is_file():
            return candidate
    raise ChromiumMissingError(f"no chromium executable found.\n{install_hint()}")


def ensure_chromium() -> Path:
    """The chromium executable, installing the Debian package first when it is missing and this
    runs as root with apt-get; otherwise ChromiumMissingError saying how to get it."""
    try:
        return chromium_binary()
    except ChromiumMissingError:
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            raise
    try:
        apt_install((DEBIAN_PACKAGE,))
    except AptInstallError as exc:
        raise ChromiumMissingError(f"{exc}\n{install_hint()}") from exc
    return chromium_binary()
