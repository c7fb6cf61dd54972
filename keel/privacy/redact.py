"""Irreversible redaction for the batch pipeline. Pure logic over detected spans.

Two token formats, both visibly different from the request path's `<PERSON_1>` placeholders:

* `typed`:  `[PERSON]`: the value is gone, only its type remains;
* `hashed`: `[PERSON:1a2b3c4d]`: an HMAC-SHA256 of the normalised value under a secret key,
  so the same person links across documents without being recoverable (32 bits of the
  digest: enough to keep distinct values apart in a corpus, useless without the key).
"""

from __future__ import annotations

import hashlib
import hmac
import re
from typing import Literal

from keel.errors import ConfigError
from keel.privacy.spans import Span

RedactionMode = Literal["typed", "hashed"]

# Values whose formatting varies ("212-555-0199" vs "(212) 555 0199") link on their characters only.
_ALNUM_TYPES = {"PHONE_NUMBER", "CREDIT_CARD", "US_SSN", "IBAN_CODE", "UK_NHS", "US_BANK_NUMBER",
                "MEDICAL_RECORD_NUMBER"}


def normalise(entity_type: str, value: str) -> str:
    if entity_type in _ALNUM_TYPES:
        return re.sub(r"[^0-9A-Za-z]", "", value).upper()
    return " ".join(value.casefold().split())


def token_for(entity_type: str, value: str, mode: RedactionMode, key: bytes) -> str:
    if mode == "typed":
        return f"[{entity_type}]"
    digest = hmac.new(key, f"{entity_type}\x00{normalise(entity_type, value)}".encode(), hashlib.sha256)
    return f"[{entity_type}:{digest.hexdigest()[:8]}]"


def redact_spans(text: str, spans: list[Span], mode: RedactionMode = "typed", key: bytes = b"") -> str:
    """Replace each (non-overlapping) span with its token."""
    if mode not in ("typed", "hashed"):
        raise ConfigError(f"unknown redaction mode {mode!r}: use 'typed' or 'hashed'")
    if mode == "hashed" and not key:
        raise ConfigError("hashed redaction needs a secret key (privacy.hash_key): `keel up` generates one, "
                          "or set KEEL_PRIVACY__HASH_KEY")
    out: list[str] = []
    pos = 0
    for span in sorted(spans):
        out.append(text[pos : span.start])
        out.append(token_for(span.type, text[span.start : span.end], mode, key))
        pos = span.end
    out.append(text[pos:])
    return "".join(out)
