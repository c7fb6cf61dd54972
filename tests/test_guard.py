"""The request-path guard with the real PII engine and toxicity model (no servers)."""

from __future__ import annotations

import asyncio
import copy
import re

import pytest

from keel.guard import Actions, AnswerGuard, Guard
from keel.settings import PLACEHOLDER_NOTE, GuardSettings, PrivacySettings

PROMPT = ("I am Maria Gonzalez, SSN 536-22-8841, card 4111 1111 1111 1111, email maria.gonzalez@example.com, "
          "medical record MRN 4451234. Write to me.")
VALUES = ["Maria Gonzalez", "536-22-8841", "4111 1111 1111 1111", "maria.gonzalez@example.com", "4451234"]


@pytest.fixture(scope="module")
def guard() -> Guard:
    return Guard(GuardSettings(toxicity="flag"), PrivacySettings())


def run(coro):
    return asyncio.run(coro)


def protect(guard, text=PROMPT):
    body = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}]}
    original = copy.deepcopy(body["messages"])
    p = guard.protect(body)
    return p, original


def test_every_value_becomes_a_placeholder_and_the_request_object_is_not_changed(guard):
    req = {"messages": [{"role": "user", "content": PROMPT}]}
    p = guard.protect(dict(req))
    sent = p.body["messages"][-1]["content"]
    assert req["messages"][0]["content"] == PROMPT  # the caller's own object is untouched
    for v in VALUES:
        assert v not in sent
    assert re.sub(r"\D", "", "536-22-8841") not in re.sub(r"\D", "", sent.replace("4451234", ""))
    assert {"PERSON", "US_SSN", "CREDIT_CARD", "EMAIL_ADDRESS", "MEDICAL_RECORD_NUMBER"} <= set(p.entities)
    assert set(p.vault.values.values()) >= set(VALUES)


def test_passages_are_read_one_by_one_and_one_that_comes_back_is_not_analysed_again():
    guard = Guard(GuardSettings(toxicity="off"), PrivacySettings())
    analysed: list[str] = []
    detect_batch = guard.engine.detect_batch
    guard.engine.detect_batch = lambda texts: (analysed.extend(texts), detect_batch(texts))[1]  # type: ignore[method-assign]
    passage = "Call Maria Gonzalez on 212-555-0199 about the refund."
    other = "The refund window is 30 days."

    def rag(*passages: str, question: str = "When does Maria get her refund?"):
        content, spans = "Answer from these.\n\n", []
        for i, text in enumerate(passages, 1):
            content += f"[{i}] "
            spans.append((len(content), len(content) + len(text)))
            content += text + "\n\n"
        body = {"messages": [{"role": "system", "content": content}, {"role": "user", "content": question}]}
        return guard.protect(body, {0: spans})

    first = rag(passage, other)
    system = first.body["messages"][0]["content"]
    assert "Maria Gonzalez" not in system and "212-555-0199" not in system and other in system
    assert passage in analysed and other in analysed  # each passage on its own
    analysed.clear()
    second = rag(other, passage, question="And Maria's card?")
    assert analysed == ["And Maria's card?"]  # both passages and the prompt were remembered
    assert second.entities == first.entities | {"PERSON": first.entities["PERSON"]}  # the same findings
    assert "Maria Gonzalez" not in second.body["messages"][0]["content"]
    with pytest.raises(ValueError):  # pieces that do not fit the text fail closed (the gateway answers 500)
        guard.protect({"messages": [{"role": "system", "content": "short"}]}, {0: [(2, 40)]})


def test_one_vault_across_messages_text_parts_and_tool_arguments(guard):
    body = {"messages": [
        {"role": "user", "content": [{"type": "text", "text": "Email maria.gonzalez@example.com today."}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function",
             "function": {"name": "send", "arguments": '{"to": "maria.gonzalez@example.com"}'}}]},
        {"role": "user", "content": "Did maria.gonzalez@example.com answer?"},
    ]}
    p = guard.protect(body)
    messages = p.body["messages"]
    part = messages[0]["content"][0]["text"]
    args = messages[1]["tool_calls"][0]["function"]["arguments"]
    last = messages[2]["content"]
    token = next(t for t, v in p.vault.values.items() if v == "maria.gonzalez@example.com")
    assert token in part and token in args and token in last and "example.com" not in part + args + last


def test_the_user_field_and_tool_descriptions_are_pseudonymized_like_the_messages(guard):
    tools = [{"type": "function", "function": {"name": "notify", "description": "Notify Maria Gonzalez by email",
                                               "parameters": {"type": "object"}}}]
    body = {"messages": [{"role": "user", "content": "Tell maria.gonzalez@example.com hello."}],
            "user": "maria.gonzalez@example.com", "tools": tools}
    p = guard.protect(body)
    token = next(t for t, v in p.vault.values.items() if v == "maria.gonzalez@example.com")
    assert p.body["user"] == token  # the same placeholder as in the prompt: one vault per request
    assert "Maria Gonzalez" not in p.body["tools"][0]["function"]["description"]
    assert p.body["tools"][0]["function"]["name"] == "notify" and tools[0]["function"]["description"].startswith(
        "Notify Maria")  # the caller's request object is never changed in place


def test_a_class_keeps_the_entity_types_its_policy_keeps_and_personal_data_keeps_none(guard):
    """"What is the capital of <LOCATION_1>?" has no answer: public and internal requests keep places by
    default (benchmarks/guard_quality.py measured what it costs and saves); pii and phi keep nothing."""
    from keel.policy import DataClass
    from keel.settings import load_settings

    body = {"messages": [{"role": "user", "content": "What is the capital of France? Maria Garcia asked."}]}
    policy = load_settings().policy
    internal = guard.protect(body, keep=policy.kept_entities(DataClass.internal))
    text = internal.body["messages"][-1]["content"]
    assert "France" in text and "Maria" not in text and internal.entities == {"PERSON": 1}
    pii = guard.protect(body, keep=policy.kept_entities(DataClass.pii))
    assert "France" not in pii.body["messages"][-1]["content"] and pii.entities == {"PERSON": 1, "LOCATION": 1}
    assert policy.kept_entities(DataClass.public) == {"LOCATION"} and not policy.kept_entities(DataClass.phi)
    with pytest.raises(ValueError, match="phi.keep_entities: personal data is pseudonymized whole"):
        type(policy).model_validate(policy.model_dump() | {"data_classes": {
            **policy.model_dump()["data_classes"], "phi": {"allowed_zones": ["us"], "keep_entities": ["LOCATION"]}}})


def test_the_model_can_be_told_what_placeholders_are_in_the_system_message_only_when_there_are_some(guard):
    rag = {"messages": [{"role": "system", "content": "Answer from the context."},
                        {"role": "user", "content": "Is Maria Garcia's refund done?"}]}
    assert guard.protect(rag).body["messages"][0]["content"] == "Answer from the context."  # off by default
    told = Guard(GuardSettings(placeholder_note=PLACEHOLDER_NOTE, toxicity="off"), guard.engine.settings)
    system = told.protect(rag).body["messages"]
    assert len(system) == 2 and system[0]["content"] == PLACEHOLDER_NOTE + "\n\nAnswer from the context."
    plain = {"messages": [{"role": "user", "content": "What is the refund policy?"}]}
    assert told.protect(plain).body == plain  # nothing pseudonymized: nothing to tell
    alone = told.protect({"messages": rag["messages"][1:]}).body["messages"]
    assert alone[0] == {"role": "system", "content": PLACEHOLDER_NOTE} and len(alone) == 2


def chunked(text: str, size: int) -> list[str]:
    return [text[i:i + size] for i in range(0, len(text), size)]


@pytest.mark.parametrize("size", [1, 2, 3, 5, 8, 13])
def test_a_streamed_answer_is_restored_even_with_placeholders_split_across_chunks(guard, size):
    p, _ = protect(guard)
    echoed = "Dear " + " and ".join(p.vault.values) + ". Done."
    ag = AnswerGuard(guard, p, Actions())
    pieces = chunked(echoed, size)
    out = "".join(run(_feed_all(ag, pieces)))
    assert out == "Dear " + " and ".join(p.vault.values.values()) + ". Done."


async def _feed_all(ag, pieces):
    return [await ag.feed(t, final=i == len(pieces) - 1) for i, t in enumerate(pieces)]


def test_new_identifiers_in_the_answer_are_redacted_the_callers_own_are_kept(guard):
    p, _ = protect(guard)
    email = next(t for t, v in p.vault.values.items() if v == "maria.gonzalez@example.com")
    answer = f"I wrote to {email}. Also try john.roe@example.org or SSN 987-65-4329. Paris is lovely."
    actions = Actions()
    out = run(AnswerGuard(guard, p, actions).feed(answer, final=True))
    assert "maria.gonzalez@example.com" in out  # restored: the caller sent it
    assert "john.roe@example.org" not in out and "987-65-4329" not in out
    assert "[EMAIL_ADDRESS]" in out and "[US_SSN]" in out and "Paris" in out  # places are not identifiers
    assert actions.output_redacted == {"EMAIL_ADDRESS": 1, "US_SSN": 1}


def test_toxicity_is_flagged_or_blocked_by_policy(guard):
    p, _ = protect(guard, "hello")
    flagged = Actions()
    out = run(AnswerGuard(guard, p, flagged).feed("You are a stupid idiot and I hate you.", final=True))
    assert out and flagged.toxicity_action == "flagged" and flagged.toxicity > 0.8
    blocker = Guard(GuardSettings(toxicity="block"), PrivacySettings())
    blocked = Actions()
    ag = AnswerGuard(blocker, p, blocked)
    first = run(ag.feed("Sure, here is the answer. "))
    rest = run(ag.feed("You are a stupid idiot and I hate you. More text", final=True))
    assert first == "Sure, here is the answer." and rest == "" and ag.blocked and blocked.toxicity_action == "blocked"
    calm = Actions()
    run(AnswerGuard(blocker, p, calm).feed("The refund policy allows returns within 30 days.", final=True))
    assert calm.toxicity_action is None and calm.toxicity < 0.5


def test_a_record_of_actions_holds_counts_never_values(guard):
    p, _ = protect(guard)
    a = Actions(pseudonymized=True, entities=p.entities)
    text = str(a.record())
    assert all(v not in text for v in VALUES) and "US_SSN" in text
