"""The privacy engine through real Presidio + spaCy: detection, batching, long texts, redaction."""

import re
from itertools import pairwise

import pytest
from pydantic import SecretStr

from keel.privacy.engine import PrivacyEngine
from keel.privacy.spans import Span, resolve_overlaps
from keel.settings import get_settings

SAMPLE = "Call John Smith at 212-555-0199 or john.smith@acme.com"


def found(text, spans):
    return {(s.type, text[s.start : s.end]) for s in spans}


def test_detect_acceptance_example(engine):
    spans = engine.detect(SAMPLE)
    assert found(SAMPLE, spans) >= {
        ("PERSON", "John Smith"),
        ("PHONE_NUMBER", "212-555-0199"),
        ("EMAIL_ADDRESS", "john.smith@acme.com"),
    }
    assert [(s.start, s.end) for s in spans] == [(5, 15), (19, 31), (35, 54)]


def test_phi_and_secrets_are_detected(engine):
    text = (
        "Patient Maria Garcia, DOB: 03/14/1962, MRN: 00482913, Medicare ID 1EG4-TE5-MK73. "
        "NHS number 943 476 5919. Deploy key AKIAIOSFODNN7EXAMPLE; password=Tr0ub4dor&3"
    )
    got = found(text, engine.detect(text))
    assert ("DATE_OF_BIRTH", "03/14/1962") in got
    assert ("MEDICAL_RECORD_NUMBER", "00482913") in got
    assert ("HEALTH_PLAN_ID", "1EG4-TE5-MK73") in got
    assert ("UK_NHS", "943 476 5919") in got
    assert ("SECRET", "AKIAIOSFODNN7EXAMPLE") in got
    assert ("SECRET", "Tr0ub4dor&3") in got
    assert any(t == "PERSON" and "Maria Garcia" in v for t, v in got)


def test_batch_equals_one_by_one(engine):
    texts = [SAMPLE, "Nothing to see here.", "Email ana@example.org, card 4111 1111 1111 1111.",
             "Dr. Ruth Bader lives at 17 Elm Street."]
    assert engine.detect_batch(texts) == [engine.detect(t) for t in texts]


def test_long_text_is_chunked_with_exact_offsets():
    """Windows overlap, so an entity on a window edge is found whole, at its true offset."""
    settings = get_settings().privacy.model_copy(update={"chunk_chars": 1000, "chunk_overlap": 120})
    engine = PrivacyEngine(settings)
    filler = "The quarterly report covers revenue, churn and the roadmap for next year. "
    text = ""
    emails = []
    while len(text) < 20_000:
        text += filler * 3
        email = f"user{len(emails)}@example.com"
        emails.append(email)
        text += f"Write to {email} today. "
    spans = engine.detect(text)
    got = [text[s.start : s.end] for s in spans if s.type == "EMAIL_ADDRESS"]
    assert got == emails
    assert all(a.end <= b.start for a, b in pairwise(spans))


def test_typed_and_hashed_redaction(engine):
    text = "John Smith emailed john.smith@acme.com; later John Smith called."
    typed = engine.redact(text)
    assert typed == "[PERSON] emailed [EMAIL_ADDRESS]; later [PERSON] called."
    hashed = engine.redact(text, mode="hashed")
    tokens = re.findall(r"\[[A-Z_]+:[0-9a-f]{8}\]", hashed)
    assert len(tokens) == 3 and tokens[0] == tokens[2] != tokens[1]  # same person links, no value leaks
    assert "John" not in hashed and "acme" not in hashed
    other_key = PrivacyEngine(get_settings().privacy.model_copy(update={"hash_key": SecretStr("another-key")}))
    assert other_key.redact(text, mode="hashed") != hashed  # keyed: no key, no linkage


def test_redaction_tokens_are_not_placeholders(engine):
    text = "Ask John Smith."
    redacted = engine.redact(text, mode="hashed")
    masked, vault = engine.pseudonymize(redacted)
    assert engine.restore(masked, vault) == redacted


def test_keels_own_tokens_and_placeholders_are_not_pii_but_a_name_beside_them_is(engine):
    # Scrubbed text read back (a retrieved passage): spaCy tags parts of the tokens as PERSON or LOCATION.
    text = ("[PERSON:1c16bcb6] wrote on [DATE_OF_BIRTH:12ab34cd] from [LOCATION], and <PERSON_1> called "
            "Maria Garcia about it. [JOHN] is not a token.")
    spans = engine.detect(text)
    marks = [m.span() for m in engine.own_marks.finditer(text)]
    assert len(marks) == 4  # "[JOHN]" is no type the engine knows: it is read like any text
    assert not [s for s in spans if any(a <= s.start and s.end <= b for a, b in marks)]
    assert ("PERSON", "Maria Garcia") in found(text, spans)


def test_overlaps_are_unioned():
    spans = [Span(0, 10, "PERSON", 0.6), Span(5, 20, "STREET_ADDRESS", 0.9), Span(30, 35, "EMAIL_ADDRESS", 1.0)]
    assert resolve_overlaps(spans) == [Span(0, 20, "STREET_ADDRESS", 0.9), Span(30, 35, "EMAIL_ADDRESS", 1.0)]


def test_presidio_baseline_profile_is_available():
    base = PrivacyEngine(get_settings().privacy, profile="presidio")
    assert base.entities is None and base.threshold == 0.0
    assert ("EMAIL_ADDRESS", "john.smith@acme.com") in found(SAMPLE, base.detect(SAMPLE))


@pytest.mark.parametrize("text", ["", " ", "\n\n", "😀" * 50, "a" * 5000])
def test_degenerate_texts_do_not_crash(engine, text):
    assert isinstance(engine.detect(text), list)
