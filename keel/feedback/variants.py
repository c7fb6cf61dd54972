"""A gateway replica's choice of prompt variant, per request, by Thompson sampling.

`VariantBoard` reads two things every `refresh_s` in a daemon thread, never on a request's path:
the versions in each prompt's pool (MLflow, `PromptSource`) and the feedback totals per version
(`counts`, the feedback store summed over zones). Every replica reads the same two, so they share
one posterior, lagging by at most one interval. The request path (`choose`) only draws from a
plain dict that a refresh swaps whole: no I/O, no lock. When a read fails the board keeps the
last one and says so in `public()`.

A prompt whose pool is empty (never registered, every version retired, or no MLflow server) falls
back to its built-in text: keel-rag's `RAG_PROMPT`, as variant `keel-rag@builtin` (version 0); an
alias has none, and nothing is added to its requests.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from keel.feedback import bandit
from keel.feedback.bandit import Arm
from keel.feedback.prompts import PROMPTS, Variant, builtin

log = logging.getLogger("keel.feedback")

Counts = Callable[[], Mapping[tuple[str, int], Arm]]  # feedback totals per (prompt, version)


class Pools(Protocol):
    """Where the pools come from: `PromptSource`, or a fake in a simulation."""

    def pools(self) -> Mapping[str, Sequence[Variant]]: ...

    def close(self) -> None: ...


class _Pool:
    """One prompt's variants and their arms, as a refresh left them (never changed after)."""

    __slots__ = ("arms", "variants")

    def __init__(self, variants: Sequence[Variant], counts: Mapping[tuple[str, int], Arm]) -> None:
        self.variants = {v.id: v for v in variants}
        self.arms = {v.id: counts.get((v.prompt, v.version), bandit.NO_FEEDBACK) for v in variants}


class VariantBoard:
    """Each prompt's pool with its posteriors; `choose` picks a variant for one request."""

    def __init__(self, source: Pools | None, counts: Counts, refresh_s: float, rng: random.Random | None = None,
                 clock: Callable[[], float] = time.time, start: bool = True) -> None:
        self.source, self.counts, self.refresh_s, self.clock = source, counts, refresh_s, clock
        self._rng = rng or random.Random()  # noqa: S311 - sampling traffic, not secrets
        self._pools: Mapping[str, Sequence[Variant]] = {}
        self._counts: Mapping[tuple[str, int], Arm] = {}
        self.current = self._table()
        self.updated_at: float | None = None
        self.error: str | None = None
        self._stop = threading.Event()
        if start:
            threading.Thread(target=self._loop, name="keel-variants", daemon=True).start()

    def choose(self, prompt: str) -> Variant | None:
        """The variant for one request of `prompt`; None when it has none (an alias nobody gave one)."""
        pool = self.current.get(prompt)
        if pool is None or not pool.variants:
            return None
        if len(pool.arms) == 1:
            return next(iter(pool.variants.values()))
        return pool.variants[bandit.choose(pool.arms, self._rng)]

    def pinned(self, prompt: str, version: int) -> Variant | None:
        """That version of `prompt` when it is in the pool (an evaluation asks for it), else None."""
        pool = self.current.get(prompt)
        return pool.variants.get(f"{prompt}@{version}") if pool is not None else None

    def refresh(self) -> None:
        errors = []
        if self.source is not None:
            try:
                self._pools = self.source.pools()
            except Exception as e:  # noqa: BLE001 - MLflow down: keep the last pools, and say so
                errors.append(f"prompts: {type(e).__name__}: {e}")
        try:
            self._counts = dict(self.counts())
        except Exception as e:  # noqa: BLE001 - the feedback store down: keep the last counts, and say so
            errors.append(f"feedback: {type(e).__name__}: {e}")
        new = self._table()
        for name, pool in new.items():
            if pool.variants.keys() != self.current[name].variants.keys():
                log.info("prompt %s: variants %s", name, ", ".join(pool.variants) or "none")
        if errors and self.error is None:
            log.warning("prompt variants not wholly refreshed (kept the last read): %s", "; ".join(errors))
        self.current, self.error = new, "; ".join(errors)[:300] or None
        if not errors:
            self.updated_at = self.clock()

    def public(self) -> dict[str, Any]:
        age = None if self.updated_at is None else round(self.clock() - self.updated_at, 1)
        prompts = {name: [{"id": vid, "version": pool.variants[vid].version, "alpha": round(arm.alpha, 3),
                           "beta": round(arm.beta, 3), "expected": round(bandit.expected(arm), 3)}
                          for vid, arm in pool.arms.items()]
                   for name, pool in self.current.items()}
        return {"refreshed_s_ago": age, "error": self.error, "prompts": prompts}

    def close(self) -> None:
        self._stop.set()
        if self.source is not None:
            self.source.close()

    def _table(self) -> dict[str, _Pool]:
        table = {}
        for name in PROMPTS.values():
            variants = self._pools.get(name) or [v for v in [builtin(name)] if v is not None]
            table[name] = _Pool(variants, self._counts)
        return table

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.refresh()
            self._stop.wait(self.refresh_s)
