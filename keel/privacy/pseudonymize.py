"""Reversible pseudonymization for the request path. Pure logic over detected spans.

`<PERSON_1>` stands for the same value wherever it recurs in one request, so a model can still
reason about "who did what"; `restore` puts the caller's values back. Two rules keep the
round trip exact whatever the input holds:

* a placeholder is never minted if that exact string already occurs in the input, so a
  literal `<PERSON_1>` typed by a user stays literal and is not confused with ours;
* `restore` replaces only the placeholders recorded in the vault, nothing that merely looks
  like one (a model inventing `<PERSON_9>` gets it back verbatim, as do `[PERSON]` tokens
  from `redact`).

Small models often rewrite a placeholder as `[PERSON_1]` or a bare `PERSON_1` (measured:
benchmarks/guard_quality.py), so `restore` takes those forms too; minting avoids the bare form
in the input, so a user's own literal `PERSON_1` is never taken for ours either.

Because `<` only opens and `>` only closes a placeholder, no placeholder occurrence in the
output can straddle an inserted placeholder and the original text around it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from keel.privacy.spans import Span

PLACEHOLDER = re.compile(r"<([A-Z][A-Z0-9_]*?)_(\d+)>")
# What restore takes for a placeholder: <PERSON_1>, [PERSON_1] or a bare PERSON_1, the brackets each optional.
_WRITTEN = re.compile(r"[<\[]?\b([A-Z][A-Z0-9_]*?)_(\d+)\b[>\]]?")
_TAIL = re.compile(r"[<\[]?[A-Z0-9_]*$")  # what may still grow into one at the end of a piece


@dataclass
class Vault:
    """Placeholder -> original value, for one request. Holds raw PII: keep it in memory only."""

    values: dict[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.values)

    def __repr__(self) -> str:  # never print the values it holds
        return f"Vault({len(self.values)} placeholders)"

    def counts_by_type(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for token in self.values:
            m = PLACEHOLDER.fullmatch(token)
            if m:
                counts[m.group(1)] = counts.get(m.group(1), 0) + 1
        return counts


def pseudonymize_spans(
    text: str, spans: list[Span], vault: Vault | None = None, avoid: tuple[str, ...] = ()
) -> tuple[str, Vault]:
    """Replace each span with a consistent placeholder. `spans` must not overlap.

    Passing an existing vault keeps placeholders consistent across several messages of one
    conversation (the same name gets the same placeholder in every message); `avoid` then
    holds the other messages, so no placeholder is minted that occurs literally in any of them.
    """
    vault = vault if vault is not None else Vault()
    by_value = {v: k for k, v in vault.values.items()}
    next_index: dict[str, int] = {}
    for minted in vault.values:
        m = PLACEHOLDER.fullmatch(minted)
        if m:
            next_index[m.group(1)] = max(next_index.get(m.group(1), 0), int(m.group(2)))

    out: list[str] = []
    pos = 0
    for span in sorted(spans):
        value = text[span.start : span.end]
        token = by_value.get(value)
        if token is None:
            kind = _type_name(span.type)
            n = next_index.get(kind, 0)
            while True:
                n += 1
                token = f"<{kind}_{n}>"
                bare = token[1:-1]  # restore also takes PERSON_1: never one the input holds
                if token not in vault.values and bare not in text and not any(bare in t for t in avoid):
                    break
            next_index[kind] = n
            vault.values[token] = value
            by_value[value] = token
        out.append(text[pos : span.start])
        out.append(token)
        pos = span.end
    out.append(text[pos:])
    return "".join(out), vault


def restore(text: str, vault: Vault) -> str:
    """Put the original values back for every placeholder this vault minted; nothing else changes."""
    if not vault.values:
        return text

    def sub(m: re.Match[str]) -> str:
        return vault.values.get(f"<{m.group(1)}_{m.group(2)}>", m.group(0))

    return _WRITTEN.sub(sub, text)


def _type_name(entity_type: str) -> str:
    name = re.sub(r"[^A-Z0-9_]", "_", entity_type.upper()) or "PII"
    return name if name[0].isalpha() else "PII_" + name


class StreamRestorer:
    """`restore` over a stream of text pieces, where a placeholder may arrive split across pieces.

    Holds back only a tail that could still become one of the vault's placeholders, in any form
    restore takes; everything before it is restored and released at once.
    """

    def __init__(self, vault: Vault) -> None:
        self.vault = vault
        self.held = ""

    def feed(self, text: str) -> str:
        if not self.vault.values:
            return text
        text = self.held + text
        tail = _TAIL.search(text).group(0)  # type: ignore[union-attr]  # matches at least ""
        if tail and self._could_be(tail):
            text, self.held = text[: len(text) - len(tail)], tail
        else:
            self.held = ""
        return restore(text, self.vault)

    def _could_be(self, tail: str) -> list[str]:
        """The vault's placeholders `tail` may still become (a complete bare one too: "]" may follow)."""
        core = tail.lstrip("<[")
        return [t for t in self.vault.values if t[1:-1].startswith(core) and (core or tail != core)]

    def end(self) -> str:
        """The held tail, once the answer is over. A placeholder cut short (max_tokens ended the answer
        inside "<PERSON_1>") never reaches the caller half-formed: the value of the one placeholder it
        can be, else nothing. A "<" or "<X" alone may be the model's own text and stays as written."""
        held, self.held = self.held, ""
        if (whole := restore(held, self.vault)) != held:  # a whole one, bracketed or bare
            return whole
        if len(held) < 3 or held[0] not in "<[" and "_" not in held:  # a word of the model's own, maybe
            return held
        could_be = self._could_be(held)
        return self.vault.values[could_be[0]] if len(could_be) == 1 else ""
