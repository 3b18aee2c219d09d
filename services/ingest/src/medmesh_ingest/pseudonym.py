"""Patient pseudonyms: the Kafka key of every clinical message, never the raw reference."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re

# A literal reference to a Patient, relative or absolute, with or without a version:
# `Patient/42`, `https://ehr.example/fhir/Patient/42`, `Patient/42/_history/3` are one patient.
# The id is FHIR's id type ([A-Za-z0-9-.]{1,64}).
_PATIENT_REFERENCE = re.compile(r"(?:^|/)Patient/([A-Za-z0-9\-.]{1,64})(?:/_history/[^/]+)?/?$")


def canonical_patient_reference(reference: str) -> str:
    """``Patient/<id>`` for a literal Patient reference in any of its forms; anything else
    (a ``urn:uuid:``, a logical reference) as it is."""
    found = _PATIENT_REFERENCE.search(reference.strip())
    return f"Patient/{found.group(1)}" if found else reference


class Pseudonymizer:
    """Keyed HMAC-SHA256 of a patient reference, rendered as 'p' + 26 base32 characters.

    The same patient always gives the same pseudonym, whichever form its reference takes
    (relative, absolute, versioned: ``canonical_patient_reference``) (so one patient's events stay ordered on
    one partition and canary assignment is sticky); without the key it cannot be reversed or
    recomputed from a guessed reference. base32 keeps digit runs short, so log redaction of
    phone-number shapes never mistakes a pseudonym for patient data.
    """

    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise ValueError("the pseudonym key must be at least 16 bytes")
        self._key = key

    def __call__(self, patient_reference: str) -> str:
        canonical = canonical_patient_reference(patient_reference)
        digest = hmac.new(self._key, canonical.encode(), hashlib.sha256).digest()
        return "p" + base64.b32encode(digest).decode("ascii").lower()[:26]
