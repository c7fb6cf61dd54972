"""Per-tenant rate limits: requests and tokens per minute, as token buckets. Pure logic and a clock.

A bucket holds a minute's allowance and refills continuously, so a tenant may burst up to its
limit and then runs at the limit's pace. Tokens are charged at admission on the estimate (prompt
plus max_tokens, as OpenAI counts them) and settled with the real usage when the answer is done.
A request bigger than what is left may overdraw a bucket that has anything left: a request larger
than a whole minute's allowance is then slow to repeat, never refused forever.

Each gateway replica keeps its own buckets with the tenant's limits divided by the replica count:
no cross-replica hop per request; Serve spreads requests evenly, so the sum holds.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class _Bucket:
    capacity: float
    per_s: float
    level: float
    stamp: float

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.per_s)
        self.stamp = now

    def wait_for(self, amount: float) -> float:
        """Seconds until `amount` fits (0 when it fits now)."""
        return max(0.0, (amount - self.level) / self.per_s)


class RateLimiter:
    def __init__(self, share: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.share, self.clock = share, clock  # share: this replica's part of each limit
        self._buckets: dict[tuple[str, str], _Bucket] = {}

    def admit(self, tenant: str, requests_per_minute: int | None, tokens_per_minute: int | None,
              tokens: int) -> float | None:
        """None when the request is admitted (and charged); else seconds until it would be."""
        now = self.clock()
        req = self._bucket(tenant, "requests", requests_per_minute, now)
        tok = self._bucket(tenant, "tokens", tokens_per_minute, now)
        waits = []
        if req is not None and req.level < 1:
            waits.append(req.wait_for(1))
        if tok is not None and tok.level <= 0:
            waits.append(tok.wait_for(min(tokens, tok.capacity)))
        if waits:
            return max(waits)
        if req is not None:
            req.level -= 1
        if tok is not None:
            tok.level -= tokens
        return None

    def headers(self, tenant: str, requests_per_minute: int | None, tokens_per_minute: int | None,
                ) -> dict[str, str]:
        """OpenAI's `x-ratelimit-*` headers for the limits the tenant has: the limit per minute, what is
        left of it (this replica's bucket scaled to the whole, as Serve spreads requests evenly) and the
        time until it is whole again."""
        out: dict[str, str] = {}
        now = self.clock()
        for what, per_minute in (("requests", requests_per_minute), ("tokens", tokens_per_minute)):
            if (b := self._bucket(tenant, what, per_minute, now)) is None:
                continue
            out[f"x-ratelimit-limit-{what}"] = str(per_minute)
            out[f"x-ratelimit-remaining-{what}"] = str(max(0, int(b.level / self.share)))
            out[f"x-ratelimit-reset-{what}"] = duration((b.capacity - b.level) / b.per_s)
        return out

    def settle(self, tenant: str, charged: int, used: int) -> None:
        """Correct a request's token charge with what it really used."""
        if (b := self._buckets.get((tenant, "tokens"))) is not None:
            b.level = min(b.capacity, b.level + charged - used)

    def _bucket(self, tenant: str, what: str, per_minute: int | None, now: float) -> _Bucket | None:
        if per_minute is None:
            return None
        capacity = max(1.0, per_minute * self.share)
        b = self._buckets.get((tenant, what))
        if b is None or b.capacity != capacity:  # new tenant, or its limit changed with the config
            b = self._buckets[(tenant, what)] = _Bucket(capacity, capacity / 60.0, capacity, now)
        b.refill(now)
        return b


def duration(seconds: float) -> str:
    """A duration as OpenAI writes its resets: "0s", "250ms", "1.5s", "6m0s"."""
    if seconds < 1:
        return f"{round(seconds * 1000)}ms" if seconds >= 0.001 else "0s"
    minutes, rest = divmod(seconds, 60)
    text = f"{rest:.3f}".rstrip("0").rstrip(".") + "s"
    return f"{int(minutes)}m{text}" if minutes else text
