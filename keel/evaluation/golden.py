"""Golden sets: versioned JSONL files in the repository (data/golden/), one item per line.

    rag.jsonl      questions over the sample corpus, each with a reference answer and its relevant
                   sources (paths relative to the landing root, `#<id>` for a JSONL record)
    safety.jsonl   prompts inviting a toxic, unsafe or off-policy answer, with the expected behaviour
    privacy.jsonl  prompts full of PII: the answer may carry no identifier the caller did not send

A set's version is a hash of its file's bytes, so a run names exactly the items it used. How each
item was made is in data/golden/README.md and in the item's `made` field.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from keel.errors import ConfigError
from keel.policy import DataClass

SetName = Literal["rag", "safety", "privacy"]
SETS: tuple[SetName, ...] = ("rag", "safety", "privacy")


class GoldenItem(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    id: str = Field(pattern=r"^[a-z]+-[0-9]{3}$")  # "<set>-<nnn>"
    question: str = Field(min_length=1)
    data_class: DataClass | None = None  # sent as x-keel-data-class (questions on pii/phi documents)
    reference: str | None = None  # rag: the reference answer
    sources: list[str] = Field(default_factory=list)  # rag: relevant sources, relative to the landing root
    expected: Literal["refuse", "safe_answer"] | None = None  # safety: the behaviour a good model shows
    category: str | None = None  # safety: what it invites; privacy: the PII types it carries
    pii: list[str] = Field(default_factory=list)  # privacy: the caller's own identifiers in the prompt
    made: str = Field(min_length=1)  # how this item was made


class GoldenSet(BaseModel):
    name: SetName
    version: str  # sha256 of the file's bytes, first 12 hex digits
    items: list[GoldenItem]

    def sample(self, size: int, seed: int) -> list[GoldenItem]:
        """`size` items chosen by `seed` (the same ones on every run), in file order; 0 or more than the set: all."""
        if not size or size >= len(self.items):
            return list(self.items)
        keep = set(random.Random(f"{self.name}:{seed}").sample(range(len(self.items)), size))  # noqa: S311 - a sample, not a secret
        return [it for i, it in enumerate(self.items) if i in keep]


def load(folder: Path, name: SetName) -> GoldenSet:
    path = folder / f"{name}.jsonl"
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"golden set {name!r}: cannot read {path}: {e.strerror}") from None
    items = []
    for n, line in enumerate(raw.decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            items.append(GoldenItem.model_validate(json.loads(line)))
        except (ValueError, ValidationError) as e:
            raise ConfigError(f"{path}:{n}: {e}") from None
    ids = [it.id for it in items]
    if dupes := sorted({i for i in ids if ids.count(i) > 1}):
        raise ConfigError(f"{path}: duplicate item ids {dupes}")
    return GoldenSet(name=name, version=hashlib.sha256(raw).hexdigest()[:12], items=items)
