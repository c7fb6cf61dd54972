"""A bounded queue that a thread of its own writes in batches: the gateway's feedback links and its traces.

`submit` only queues (no I/O, never a wait), so an event loop can hand work over. The thread waits for
a first item, gathers what arrives within `gather_s` of it (what is waiting already, however late), up
to `max_batch`, and hands the batch to `write`: sequential requests share one transaction or one POST.

`flush` queues a marker behind what it waits for. The marker ends the gathering at once and is set
when its batch is written, so a flush never waits out the window and needs no shared flag. `close`
queues an end marker the same way: what was queued before it is written first.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

log = logging.getLogger("keel.batching")

T = TypeVar("T")


@dataclass(frozen=True)
class _Mark:
    """In the queue behind the items it waits for: a flush's event, or None for close's end."""

    done: threading.Event | None


class BatchWriter(Generic[T]):
    def __init__(self, write: Callable[[list[T]], None], *, name: str, max_queued: int, gather_s: float,
                 max_batch: int) -> None:
        self.write, self.name, self.gather_s, self.max_batch = write, name, gather_s, max_batch
        self._queue: queue.Queue[T | _Mark] = queue.Queue(max_queued)
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, item: T) -> None:
        """Queue an item; raises queue.Full when the writer is far behind, or closed."""
        if self._closed:
            raise queue.Full
        self._queue.put_nowait(item)

    def flush(self, timeout_s: float | None = None) -> bool:
        """Whether everything queued before the call was written within `timeout_s` (None: however long)."""
        if not self._thread.is_alive():  # closed: close wrote what was queued
            return True
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        done = threading.Event()
        try:
            self._queue.put(_Mark(done), timeout=timeout_s)
        except queue.Full:
            return False
        while not done.wait(1.0 if deadline is None else max(0.0, min(1.0, deadline - time.monotonic()))):
            if not self._thread.is_alive():  # closed meanwhile: close wrote what was queued before its end
                return True
            if deadline is not None and time.monotonic() >= deadline:
                return False
        return True

    def close(self, timeout_s: float | None = 10.0) -> None:
        """Write what is queued, then stop the thread; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(_Mark(None))  # blocks on a full queue only until the thread takes from it
        self._thread.join(timeout_s)

    def _run(self) -> None:
        while True:
            items, mark = self._gather()
            if items:
                try:
                    self.write(items)
                except Exception:  # the writer reports its own failures; this guard keeps the thread alive
                    log.exception("%s: a batch of %d could not be written", self.name, len(items))
            if mark is not None:
                if mark.done is None:
                    return
                mark.done.set()

    def _gather(self) -> tuple[list[T], _Mark | None]:
        """The next batch, and the marker that ended it (None: the window passed or the batch is full)."""
        items: list[T] = []
        item = self._queue.get()
        deadline = time.monotonic() + self.gather_s
        while not isinstance(item, _Mark):
            items.append(item)
            if len(items) >= self.max_batch:
                return items, None
            try:
                item = self._queue.get(timeout=max(deadline - time.monotonic(), 0))
            except queue.Empty:
                return items, None
        return items, item
