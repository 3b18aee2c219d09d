"""Jars from Maven Central for the parts of the local stack that run on the JVM (the Kafka
broker, HAPI's FHIR validator): each part's pom in deploy/ lists them, and
``copy_dependencies`` resolves them once into a cache folder outside the repository."""

from __future__ import annotations

import subprocess
from pathlib import Path


def copy_dependencies(mvn: str, pom: Path, lib: Path, what: str) -> None:
    """Copy the runtime dependencies of ``pom`` into ``lib`` (``mvn`` is Maven's executable);
    RuntimeError naming ``what`` with Maven's output when it cannot resolve them."""
    lib.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        [
            mvn,
            "-q",
            "-B",
            "-f",
            str(pom),
            "dependency:copy-dependencies",
            f"-DoutputDirectory={lib}",
            "-DincludeScope=runtime",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"{what}: Maven could not resolve the jars of {pom}:\n"
            f"{result.stdout[-3000:]}{result.stderr[-3000:]}"
        )
