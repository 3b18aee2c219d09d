"""HAPI FHIR's validator over everything medmesh says is FHIR: the golden reports, a report of
every kind the builder makes now, and the input fixtures meant to be valid, each in its FHIR
version, offline (medmesh_cli.devstack.hapi_validator). No file may have an error or a fatal
error; warnings (LOINC and SNOMED CT codes it cannot look up offline, best-practice advice) are
counted and printed, not failed.

The validator is HAPI's (the Maven artefacts of deploy/hapi-validator/pom.xml), not fhir.resources:
it checks invariants, bindings to FHIR's own value sets, references inside a Bundle and the
Bundle rules that fhir.resources leaves out. Java and Maven are required: without them the tests
fail, naming what is missing, as the Kafka tier does.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import pytest

from medmesh_cli.devstack import hapi_validator
from medmesh_cli.devstack.hapi_validator import (
    FHIR_VERSIONS,
    Issue,
    ValidatorFhirVersion,
    validate_all,
)
from tests.conformance.report_cases import ROOT, report_cases

GOLDEN = ROOT / "tests" / "fixtures" / "reports"
FIXTURES = ROOT / "tests" / "fixtures" / "fhir"

# Fixtures invalid on purpose, with the reason; every other *.json under tests/fixtures/fhir must
# be valid. test_the_invalid_fixtures_are_invalid keeps this list honest.
INVALID_ON_PURPOSE = {
    "bundle-invalid-status.json": "Observation.status 'bogus': ingest must answer 422 (EXPECTED.md)",
}


def _version_of(name: str) -> ValidatorFhirVersion:
    """A file's FHIR version from its name: an ``r4``, ``r4b`` or ``r5`` part, R4B by default
    (the fixtures' convention: ``ecg-af-r5.json``, ``r4-subscription-handshake.json``)."""
    parts = set(Path(name).stem.lower().split("-"))
    found = [version for version in FHIR_VERSIONS if version.lower() in parts]
    if len(found) > 1:
        raise ValueError(f"{name} names more than one FHIR version: {found}")
    return found[0] if found else "R4B"


def _goldens() -> list[str]:
    return sorted(path.name for path in GOLDEN.glob("*.json"))


def _fixtures() -> list[str]:
    return sorted(str(path.relative_to(FIXTURES)) for path in FIXTURES.rglob("*.json"))


def _valid_fixtures() -> list[str]:
    return [name for name in _fixtures() if Path(name).name not in INVALID_ON_PURPOSE]


Results = dict[str, tuple[ValidatorFhirVersion, list[Issue]]]


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Results:
    """Every file's messages, keyed ``golden/<name>``, ``built/<case>`` or ``fixture/<path>``:
    one validator run per FHIR version for all of them."""
    built = tmp_path_factory.mktemp("built-reports")
    files: dict[str, tuple[ValidatorFhirVersion, Path]] = {}
    for name in _goldens():
        files[f"golden/{name}"] = (_version_of(name), GOLDEN / name)
    for name, case in sorted(report_cases().items()):
        path = built / f"{name}.json"
        path.write_text(json.dumps(case.build(), indent=2))
        files[f"built/{name}"] = (case.fhir_version, path)
    for name in _fixtures():
        files[f"fixture/{name}"] = (_version_of(name), FIXTURES / name)

    by_version: dict[ValidatorFhirVersion, list[Path]] = {}
    for version, path in files.values():
        by_version.setdefault(version, []).append(path)
    started = time.monotonic()
    validated = validate_all(by_version)
    elapsed = time.monotonic() - started

    out: Results = {}
    for key, (version, path) in files.items():
        out[key] = (version, validated[version][path])
    _print_summary(out, elapsed)
    return out


def _print_summary(results: Results, elapsed: float) -> None:
    """Per FHIR version and kind of file: files, errors, warnings (shown with ``pytest -s``)."""
    lines = [f"HAPI validator: {len(results)} files in {elapsed:.1f} s"]
    rows: dict[tuple[str, str], list[int]] = {}
    for key, (version, issues) in results.items():
        row = rows.setdefault((version, key.split("/")[0]), [0, 0, 0])
        row[0] += 1
        row[1] += sum(issue.is_error for issue in issues)
        row[2] += sum(issue.severity == "warning" for issue in issues)
    for (fhir, kind), (count, errors, warnings) in sorted(rows.items()):
        lines.append(f"  {fhir:4} {kind:8} {count:3} files {errors:3} errors {warnings:4} warnings")
    sys.stdout.write("\n" + "\n".join(lines) + "\n")


def _errors(results: Results, key: str) -> list[str]:
    return [str(issue) for issue in results[key][1] if issue.is_error]


@pytest.mark.parametrize("name", _goldens())
def test_every_golden_report_is_valid(results: Results, name: str) -> None:
    """Each golden report has no error in HAPI's validator, in its FHIR version."""
    assert _errors(results, f"golden/{name}") == []


@pytest.mark.parametrize("name", sorted(report_cases()))
def test_every_kind_of_built_report_is_valid(results: Results, name: str) -> None:
    """The builder's report of each case (every kind of report, each FHIR version) has no error
    in HAPI's validator."""
    assert _errors(results, f"built/{name}") == []


@pytest.mark.parametrize("name", _valid_fixtures())
def test_every_input_fixture_is_valid(results: Results, name: str) -> None:
    """Each FHIR input fixture not invalid on purpose has no error in HAPI's validator."""
    assert _errors(results, f"fixture/{name}") == []


@pytest.mark.parametrize("name", sorted(INVALID_ON_PURPOSE))
def test_the_invalid_fixtures_are_invalid(results: Results, name: str) -> None:
    """Each fixture listed as invalid on purpose exists and has an error: the list hides no valid
    fixture, and the validator does report errors."""
    assert _errors(results, f"fixture/{name}") != []


def test_every_fhir_version_of_the_reports_is_validated(results: Results) -> None:
    """The goldens and the built reports cover every FHIR version the builder speaks."""
    built = {version for key, (version, _) in results.items() if key.startswith("built/")}
    golden = {version for key, (version, _) in results.items() if key.startswith("golden/")}
    assert built == {case.fhir_version for case in report_cases().values()}
    assert golden <= built


def test_a_file_is_read_in_the_version_its_name_says() -> None:
    """A fixture's FHIR version comes from an r4 / r4b / r5 part of its name, R4B otherwise."""
    assert _version_of("ecg-af-r5.json") == "R5"
    assert _version_of("r4-subscription-handshake.json") == "R4"
    assert _version_of("deterioration-v1-r4b.json") == "R4B"
    assert _version_of("one-by-one/hr.json") == "R4B"


@pytest.mark.parametrize("tool", ["java", "javac", "mvn"])
def test_a_missing_tool_fails_naming_it(
    tool: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Without java, javac or mvn the validator does not start and says which one is missing
    (a fresh cache, so the jars and launcher must be made)."""
    monkeypatch.setenv("MEDMESH_CACHE_DIR", str(tmp_path))
    found = shutil.which

    def which(name: str) -> str | None:
        return None if name == tool else found(name)

    monkeypatch.setattr(shutil, "which", which)
    if tool == "javac":
        # javac is asked for after Maven: stop there with the jars marked present.
        (tmp_path / f"hapi-validator-{hapi_validator.hapi_version()}" / "lib").mkdir(parents=True)
        (tmp_path / f"hapi-validator-{hapi_validator.hapi_version()}" / "lib" / ".complete").touch()

    with pytest.raises(RuntimeError, match=f"'{tool}'.* is not on PATH"):
        hapi_validator.ensure_validator()
