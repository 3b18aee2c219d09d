"""Logs never carry patient data, even when a whole resource is logged by mistake."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from medmesh_runtime.logging import REDACTED, configure_logging, get_logger

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "fhir"


def _patient_values(bundle: dict[str, Any]) -> list[str]:
    patient = next(
        e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Patient"
    )
    values = [patient["birthDate"], *(i["value"] for i in patient.get("identifier", []))]
    values += [n["family"] for n in patient.get("name", [])]
    values += [t["value"] for t in patient.get("telecom", [])]
    values += [a["line"][0] for a in patient.get("address", []) if a.get("line")]
    return values


def test_a_logged_resource_loses_names_identifiers_birth_dates_addresses_and_phones(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Logging a whole Bundle with a Patient writes none of the patient's data."""
    bundle = json.loads((FIXTURES / "vitals-bundle-high.json").read_text())
    secrets = _patient_values(bundle)
    assert len(secrets) >= 4
    configure_logging("test", "INFO")
    get_logger("test").info("oops, logged the payload", payload=bundle, text=json.dumps(bundle))
    line = capsys.readouterr().err.strip().splitlines()[-1]
    record = json.loads(line)
    assert record["event"] == "oops, logged the payload"
    for secret in secrets:
        assert secret not in line, secret
    assert REDACTED in line


def test_stdlib_loggers_are_redacted_too(capsys: pytest.CaptureFixture[str]) -> None:
    """A library's plain logging call with a patient reference and phone is scrubbed."""
    configure_logging("test", "INFO")
    logging.getLogger("some.library").warning("failed for Patient/abc-123 call +44 20 7946 0958")
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "abc-123" not in line
    assert "7946" not in line
    assert json.loads(line)["service"] == "test"


def test_safe_ids_are_kept(capsys: pytest.CaptureFixture[str]) -> None:
    """Correlation ids and pseudonyms stay readable in logs."""
    configure_logging("test", "INFO")
    get_logger("test").info(
        "routed",
        correlation_id="0b7e3a52-4c1e-4f3a-9a8d-2f6c7d1e5b90",
        patient_pseudonym="pabcdefghijklmnopqrstuvwxyz",
    )
    record = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert record["correlation_id"] == "0b7e3a52-4c1e-4f3a-9a8d-2f6c7d1e5b90"
    assert record["patient_pseudonym"] == "pabcdefghijklmnopqrstuvwxyz"
