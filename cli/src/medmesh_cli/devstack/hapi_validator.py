"""HAPI FHIR's instance validator, run offline over files, for the conformance tests.

The validator's jars are resolved by Maven from deploy/hapi-validator/pom.xml into the cache the
Kafka jars use (~/.cache/medmesh, outside the repository) once, and the launcher
deploy/hapi-validator/src/.../ValidateFiles.java is compiled there with javac, again once per
source. A run starts one JVM per FHIR version and validates every file of that version in it:
starting Java and loading a version's core definitions takes tens of seconds, a file well under
one. Nothing is fetched while validating (no terminology server): codes of systems with no local
definition, such as LOINC and SNOMED CT, come back as warnings, not errors.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from collections.abc import Iterable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal, get_args

from medmesh_cli.devstack.maven import JavaLauncher, ensure_java_launcher, pom_property
from medmesh_cli.devstack.paths import cache_dir, repo_root

ValidatorFhirVersion = Literal["R4", "R4B", "R5"]
FHIR_VERSIONS: tuple[ValidatorFhirVersion, ...] = get_args(ValidatorFhirVersion)
MAIN_CLASS = "dev.medmesh.validator.ValidateFiles"
# A version's core definitions fit in 1 GiB; a small heap with the serial collector keeps the
# validators side by side within a two-core, shared CI machine. A run is short and mostly parses
# definitions once: the quick C1 compiler alone costs about 20 % less CPU than C1 and C2.
JVM_OPTIONS = ("-Xmx1g", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1")


@dataclass(frozen=True)
class Issue:
    """One message of the validator about one file."""

    severity: str
    location: str
    message: str
    message_id: str

    @property
    def is_error(self) -> bool:
        """An error or a fatal error (not a warning or information)."""
        return self.severity in ("error", "fatal")

    def __str__(self) -> str:
        return f"{self.severity} {self.location}: {self.message} [{self.message_id}]"


# The validator's jars and launcher (``java -cp`` its classpath).
Validator = JavaLauncher


def _project() -> Path:
    return repo_root() / "deploy" / "hapi-validator"


def hapi_version() -> str:
    """The HAPI FHIR version pinned in deploy/hapi-validator/pom.xml."""
    return pom_property(_project(), "hapi.version")


def ensure_validator() -> Validator:
    """The validator, resolving its jars (Maven) and compiling its launcher (javac) on first use."""
    root = cache_dir() / f"hapi-validator-{hapi_version()}"
    return ensure_java_launcher(_project(), root, "HAPI validator")


def _command(validator: Validator, version: ValidatorFhirVersion, paths: list[Path]) -> list[str]:
    if version not in FHIR_VERSIONS:
        raise ValueError(f"HAPI validator: unknown FHIR version {version!r}")
    return [
        validator.java,
        *JVM_OPTIONS,
        "-cp",
        validator.classpath,
        MAIN_CLASS,
        version,
        *map(str, paths),
    ]


def _parse(
    version: str, paths: list[Path], returncode: int, stdout: str, stderr: str
) -> dict[Path, list[Issue]]:
    if returncode != 0:
        raise RuntimeError(
            f"HAPI validator ({version}) exited {returncode}:\n{stdout[-2000:]}{stderr[-3000:]}"
        )
    by_name = {str(path): path for path in paths}
    results: dict[Path, list[Issue]] = {}
    for line in stdout.splitlines():
        # Only the launcher's lines: a library that prints to stdout must not break the parse.
        if not line.startswith('{"file":'):
            continue
        record = json.loads(line)
        results[by_name[record["file"]]] = [
            Issue(
                severity=issue["severity"],
                location=issue["location"] or "",
                message=issue["message"] or "",
                message_id=issue["id"] or "",
            )
            for issue in record["issues"]
        ]
    missing = [str(path) for path in paths if path not in results]
    if missing:
        raise RuntimeError(
            f"HAPI validator ({version}) gave no result for {missing}:\n{stderr[-3000:]}"
        )
    return results


def validate_all(
    files: Mapping[ValidatorFhirVersion, Iterable[Path]],
) -> dict[ValidatorFhirVersion, dict[Path, list[Issue]]]:
    """Every file validated in its FHIR version: one JVM per version, the versions side by side
    (each spends most of its time loading its own definitions, mostly on one core)."""
    validator = ensure_validator()
    batches = {version: list(paths) for version, paths in files.items() if paths}
    results: dict[ValidatorFhirVersion, dict[Path, list[Issue]]] = {}
    with ExitStack() as stack:
        running: dict[ValidatorFhirVersion, tuple[subprocess.Popen[bytes], IO[bytes], IO[bytes]]]
        running = {}
        for version, paths in batches.items():
            # Files, not pipes: a validator whose output filled a pipe would stall until the
            # ones before it had finished and been read.
            stdout = stack.enter_context(tempfile.TemporaryFile())
            stderr = stack.enter_context(tempfile.TemporaryFile())
            process = subprocess.Popen(
                _command(validator, version, paths), stdout=stdout, stderr=stderr
            )
            stack.callback(_end, process)
            running[version] = (process, stdout, stderr)
        for version, (process, out, err) in running.items():
            returncode = process.wait()
            out.seek(0)
            err.seek(0)
            results[version] = _parse(
                version,
                batches[version],
                returncode,
                out.read().decode(),
                err.read().decode(errors="replace"),
            )
    return results


def _end(process: subprocess.Popen[bytes]) -> None:
    """Stop a validator still running when the batch is abandoned (another version failed)."""
    if process.poll() is None:
        process.kill()
        process.wait()


def validate(version: ValidatorFhirVersion, paths: Iterable[Path]) -> dict[Path, list[Issue]]:
    """Every file validated as FHIR ``version`` in one JVM: each file's messages, all severities."""
    batch = list(paths)
    if not batch:
        return {}
    return validate_all({version: batch})[version]
