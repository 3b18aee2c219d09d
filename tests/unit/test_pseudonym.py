"""Patient pseudonyms."""

from __future__ import annotations

import pytest

from medmesh_ingest.pseudonym import Pseudonymizer, canonical_patient_reference

KEY = b"0123456789abcdef0123456789abcdef"


def test_same_reference_same_pseudonym() -> None:
    """A patient reference always maps to the same pseudonym under one key."""
    pseudonymize = Pseudonymizer(KEY)
    assert pseudonymize("Patient/123") == pseudonymize("Patient/123")


def test_pseudonym_hides_the_reference_and_depends_on_the_key() -> None:
    """The pseudonym does not contain the reference, and another key gives another pseudonym."""
    first = Pseudonymizer(KEY)("Patient/123")
    other = Pseudonymizer(KEY[::-1])("Patient/123")
    assert "123" not in first
    assert first != other
    assert first.startswith("p")
    assert len(first) == 27


def test_short_keys_are_refused() -> None:
    """A key shorter than 16 bytes is rejected."""
    with pytest.raises(ValueError, match="16 bytes"):
        Pseudonymizer(b"short")


@pytest.mark.parametrize(
    "reference",
    [
        "Patient/42",
        "https://ehr.example.org/fhir/Patient/42",
        "Patient/42/_history/3",
        "http://ehr.example.org/fhir/Patient/42/_history/7",
        " Patient/42 ",
    ],
)
def test_every_form_of_one_patient_reference_is_one_pseudonym(reference: str) -> None:
    """Relative, absolute and versioned references to Patient/42 give Patient/42's pseudonym."""
    pseudonymize = Pseudonymizer(KEY)
    assert pseudonymize(reference) == pseudonymize("Patient/42")


def test_other_references_are_kept_apart() -> None:
    """Another patient, an Observation/42 and a urn:uuid reference are not taken for Patient/42."""
    pseudonymize = Pseudonymizer(KEY)
    forty_two = pseudonymize("Patient/42")
    others = ["Patient/421", "Observation/42", "urn:uuid:7d5c3c2e-0000-4000-8000-000000000042"]
    assert all(pseudonymize(r) != forty_two for r in others)
    assert canonical_patient_reference("urn:uuid:abc") == "urn:uuid:abc"
