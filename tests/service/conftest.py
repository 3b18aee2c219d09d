"""Service-tier helpers: the real app factories on faststream's in-memory TestKafkaBroker."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SPECS_DIR = REPO / "deploy" / "models"
FIXTURES = REPO / "tests" / "fixtures" / "fhir"
