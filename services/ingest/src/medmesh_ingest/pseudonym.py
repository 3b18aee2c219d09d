"""Patient pseudonyms: the Kafka key of every clinical message, never the raw reference."""

from __future__ import annotations

import base64
import hashlib
import hmac


class Pseudonymizer:
    """Keyed HMAC-SHA256 of a patient reference, rendered as 'p' + 26 base32 characters.

    The same reference always gives the same pseudonym (so one patient's events stay ordered on
    one partition and canary assignment is sticky); without the key it cannot be reversed or
    recomputed from a guessed reference. base32 keeps digit runs short, so log redaction of
    phone-number shapes never mistakes a pseudonym for patient data.
    """

    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise ValueError("the pseudonym key must be at least 16 bytes")
        self._key = key

    def __call__(self, patient_reference: str) -> str:
        digest = hmac.new(self._key, patient_reference.encode(), hashlib.sha256).digest()
        return "p" + base64.b32encode(digest).decode("ascii").lower()[:26]
