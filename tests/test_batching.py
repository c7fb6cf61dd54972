"""The batching writer behind the feedback links and the traces: what arrives within the window is one batch,
a flush or a close cuts the window short and waits for what came before it, a full queue refuses at once,
and a failing batch does not stop the thread."""

from __future__ import annotations

import queue
import threading
import time

import pytest

from keel.batching import BatchWriter


class Recorder:
    def __init__(self, fail_first: bool = False, gate: threading.Event | None = None) -> None:
        self.batches: list[list[int]] = []
        self.fail_first, self.gate = fail_first, gate

    def __call__(self, batch: list[int]) -> None:
        if self.gate is not None:
            self.gate.wait(10)
        if self.fail_first:
            self.fail_first = False
            raise RuntimeError("the database is down")
        self.batches.append(batch)


def test_items_arriving_one_by_one_share_a_batch_and_flush_does_not_wait_out_the_window() -> None:
    rec = Recorder()
    w = BatchWriter(rec, name="t", max_queued=100, gather_s=30.0, max_batch=100)
    for i in range(20):
        w.submit(i)
        time.sleep(0.002)
    start = time.monotonic()
    assert w.flush(10)
    assert time.monotonic() - start < 5.0  # not the 30 s window
    assert rec.batches == [list(range(20))]
    assert w.flush(1) and rec.batches == [list(range(20))]  # nothing queued: no empty batch
    w.close()


def test_a_batch_ends_at_max_batch_and_after_the_window() -> None:
    rec = Recorder()
    w = BatchWriter(rec, name="t", max_queued=100, gather_s=0.05, max_batch=4)
    for i in range(10):
        w.submit(i)
    assert w.flush(10)
    assert [len(b) for b in rec.batches] == [4, 4, 2] and sum(rec.batches, []) == list(range(10))
    w.submit(10)
    time.sleep(0.5)  # the window passes with no flush: written anyway
    assert rec.batches[-1] == [10]
    w.close()


def test_a_failing_batch_is_logged_and_the_thread_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    rec = Recorder(fail_first=True)
    w = BatchWriter(rec, name="t", max_queued=10, gather_s=0.01, max_batch=10)
    w.submit(1)
    assert w.flush(10)
    assert rec.batches == [] and "a batch of 1 could not be written" in caplog.text
    w.submit(2)
    assert w.flush(10) and rec.batches == [[2]]
    w.close()


def test_a_full_queue_refuses_at_once_and_a_flush_can_time_out() -> None:
    gate = threading.Event()  # the writer is stuck on its first batch
    rec = Recorder(gate=gate)
    w = BatchWriter(rec, name="t", max_queued=3, gather_s=0.0, max_batch=1)
    w.submit(0)
    deadline = time.monotonic() + 5
    while w._queue.qsize() and time.monotonic() < deadline:  # the thread took item 0 and waits at the gate
        time.sleep(0.01)
    for i in (1, 2, 3):
        w.submit(i)
    start = time.monotonic()
    with pytest.raises(queue.Full):
        w.submit(4)
    assert not w.flush(0.3)  # no room even for its marker
    assert time.monotonic() - start < 2.0
    gate.set()
    assert w.flush(10) and sum(rec.batches, []) == [0, 1, 2, 3]
    w.close()


def test_close_writes_what_was_queued_and_then_refuses() -> None:
    rec = Recorder()
    w = BatchWriter(rec, name="t", max_queued=100, gather_s=30.0, max_batch=100)
    for i in range(5):
        w.submit(i)
    start = time.monotonic()
    w.close()
    assert time.monotonic() - start < 5.0 and rec.batches == [[0, 1, 2, 3, 4]]
    with pytest.raises(queue.Full):
        w.submit(5)
    assert w.flush(1)  # nothing is waiting
    w.close()  # twice: nothing happens
