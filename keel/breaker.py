"""A circuit breaker per model target: closed, open, half-open.

Closed passes traffic and counts consecutive failures; at `failures` it opens and refuses
traffic for `cooldown_s`; then it is half-open and lets one probe through: success closes it,
failure opens it again. Pure state with an injectable clock, so it is tested without sleeping.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

State = Literal["closed", "open", "half_open"]
TRANSITIONS_KEPT = 32  # a replica lives for weeks: the latest transitions only


@dataclass
class CircuitBreaker:
    failures: int = 3
    cooldown_s: float = 15.0
    clock: Callable[[], float] = time.monotonic
    state: State = "closed"
    consecutive: int = 0
    opened_at: float | None = None
    probing: bool = False
    # (time, new state), newest last; for tests and debugging (the state gauge reads `status`).
    transitions: deque[tuple[float, State]] = field(default_factory=lambda: deque(maxlen=TRANSITIONS_KEPT))
    # Told each new state as it is entered (the gateway's metrics count them); it must not raise.
    on_transition: Callable[[State], None] | None = field(default=None, repr=False, compare=False)

    def allow(self) -> bool:
        """May a request go to this target now? (In half-open, only one probe at a time.)"""
        if self.state == "open" and not self.probe_in():
            self._to("half_open")
        if self.state == "closed":
            return True
        if self.state == "half_open" and not self.probing:
            self.probing = True
            return True
        return False

    @property
    def available(self) -> bool:
        """Would allow() let a request through? (Routing asks this without taking the probe.)"""
        if self.state == "open":
            return not self.probe_in()
        return self.state == "closed" or not self.probing

    def probe_in(self) -> float:
        """Seconds until an open breaker lets a probe through (0 when it is not open or has cooled down)."""
        if self.state != "open":
            return 0.0
        return max(0.0, self.cooldown_s - (self.clock() - (self.opened_at or 0.0)))

    @property
    def status(self) -> State:
        """The state as the next request would find it (an open breaker past its cooldown is half-open)."""
        return "half_open" if self.state == "open" and self.available else self.state

    def success(self) -> None:
        self.consecutive = 0
        self.probing = False
        if self.state != "closed":
            self._to("closed")

    def failure(self) -> None:
        self.consecutive += 1
        self.probing = False
        if self.state == "half_open" or (self.state == "closed" and self.consecutive >= self.failures):
            self.opened_at = self.clock()
            self._to("open")

    def release(self) -> None:
        """The request ended with neither verdict (the caller went away): free the probe slot."""
        self.probing = False

    def _to(self, state: State) -> None:
        self.state = state
        self.transitions.append((self.clock(), state))
        if self.on_transition is not None:
            self.on_transition(state)
