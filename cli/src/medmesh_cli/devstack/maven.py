"""Jars from Maven Central for the parts of the local stack that run on the JVM (the Kafka
broker, HAPI's FHIR validator and JPA server): each part's pom in deploy/ lists them, and
``copy_dependencies`` resolves them once into a cache folder outside the repository."""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path


def pom_property(project: Path, name: str) -> str:
    """A property ``<name>`` pinned in ``project``/pom.xml (e.g. ``hapi.version``)."""
    pom = (project / "pom.xml").read_text()
    match = re.search(rf"<{re.escape(name)}>([^<]+)</{re.escape(name)}>", pom)
    if match is None:
        raise RuntimeError(f"{project / 'pom.xml'} has no <{name}>")
    return match.group(1)


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


@dataclass(frozen=True)
class JavaLauncher:
    """The resolved jars, the compiled launcher and the java to run them with."""

    lib: Path
    classes: Path
    java: str

    @property
    def classpath(self) -> str:
        """The launcher's classes, then every resolved jar."""
        return f"{self.classes}:{self.lib}/*"


def ensure_java_launcher(project: Path, root: Path, what: str) -> JavaLauncher:
    """The jars of ``project``'s pom resolved into ``root``/lib (once) and its launcher sources
    (``project``/src/main/java) compiled with javac into ``root``/classes-<hash of the sources>
    (once per source). RuntimeError naming ``what`` when Java, Maven, javac or the sources are
    missing or fail."""
    java = shutil.which("java")
    if java is None:
        raise RuntimeError(f"{what}: 'java' is not on PATH; it needs Java 17+")
    lib = root / "lib"
    if not (lib / ".complete").exists():
        mvn = shutil.which("mvn")
        if mvn is None:
            raise RuntimeError(
                f"{what}: 'mvn' (Apache Maven) is not on PATH; it fetches the jars once"
            )
        copy_dependencies(mvn, project / "pom.xml", lib, what)
        (lib / ".complete").write_text("")
    sources = sorted((project / "src" / "main" / "java").rglob("*.java"))
    if not sources:
        raise RuntimeError(f"{what}: no launcher source under {project}/src/main/java")
    digest = hashlib.sha256()
    for source in sources:
        digest.update(source.read_bytes())
    # Keyed by the sources' hash: an edited launcher is compiled afresh, an unchanged one never.
    classes = root / f"classes-{digest.hexdigest()[:16]}"
    if (classes / ".complete").exists():
        return JavaLauncher(lib, classes, java)
    javac = shutil.which("javac")
    if javac is None:
        raise RuntimeError(f"{what}: 'javac' is not on PATH; a Java 17+ JDK compiles the launcher")
    shutil.rmtree(classes, ignore_errors=True)
    classes.mkdir(parents=True)
    result = subprocess.run(
        [javac, "-d", str(classes), "-cp", f"{lib}/*", *map(str, sources)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"{what}: javac failed on the launcher:\n{result.stdout}{result.stderr}")
    (classes / ".complete").write_text("")
    return JavaLauncher(lib, classes, java)
