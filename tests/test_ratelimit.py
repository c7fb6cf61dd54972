"""Per-tenant token buckets, on a fake clock (pure logic)."""

from keel.ratelimit import RateLimiter


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_requests_per_minute_burst_then_pace_per_tenant():
    clock = Clock()
    rl = RateLimiter(clock=clock)
    assert all(rl.admit("a", 6, None, 10) is None for _ in range(6))
    wait = rl.admit("a", 6, None, 10)
    assert wait is not None and 9.9 < wait <= 10.0  # one request refills every 10 s
    assert rl.admit("b", 6, None, 10) is None  # another tenant has its own bucket
    clock.t += 10
    assert rl.admit("a", 6, None, 10) is None
    assert rl.admit("a", 6, None, 10) is not None


def test_tokens_per_minute_charge_estimate_then_settle_on_usage():
    clock = Clock()
    rl = RateLimiter(clock=clock)
    assert rl.admit("a", None, 1000, 600) is None
    assert rl.admit("a", None, 1000, 600) is None  # overdraws what was left: -200
    wait = rl.admit("a", None, 1000, 600)
    assert wait is not None and abs(wait - 48.0) < 1e-6  # (600 - -200) tokens at 1000/60 per second
    rl.settle("a", 600, 100)  # the two requests really used 100 each: 1000 back
    rl.settle("a", 600, 100)
    assert rl.admit("a", None, 1000, 600) is None


def test_a_request_above_the_whole_allowance_is_slow_never_refused_forever():
    clock = Clock()
    rl = RateLimiter(clock=clock)
    assert rl.admit("a", None, 100, 5000) is None
    wait = rl.admit("a", None, 100, 5000)
    assert wait is not None
    clock.t += wait
    assert rl.admit("a", None, 100, 5000) is None


def test_each_replica_enforces_its_share_and_a_config_change_applies():
    clock = Clock()
    rl = RateLimiter(share=0.5, clock=clock)
    assert [rl.admit("a", 4, None, 1) for _ in range(3)][-1] is not None  # 2 per replica of 2
    assert rl.admit("a", 40, None, 1) is None  # a raised limit starts a new, full bucket


def test_headers_say_the_limit_what_is_left_and_when_it_is_whole_again_as_openai_does():
    clock = Clock()
    rl = RateLimiter(share=0.5, clock=clock)  # one of two replicas: half of each limit here
    assert rl.headers("a", None, None) == {}  # no limit, nothing to say
    assert rl.admit("a", 60, 6000, 1000) is None
    assert rl.headers("a", 60, 6000) == {
        "x-ratelimit-limit-requests": "60", "x-ratelimit-remaining-requests": "58", "x-ratelimit-reset-requests": "2s",
        "x-ratelimit-limit-tokens": "6000", "x-ratelimit-remaining-tokens": "4000",
        "x-ratelimit-reset-tokens": "20s"}  # this replica refills at half the pace
    clock.t += 1.5
    assert rl.headers("a", 60, None)["x-ratelimit-reset-requests"] == "500ms"


def test_durations_are_written_as_openai_writes_them():
    from keel.ratelimit import duration

    assert [duration(s) for s in (0, 0.0004, 0.25, 1, 1.5, 59.9994, 360, 361.25)] == [
        "0s", "0s", "250ms", "1s", "1.5s", "59.999s", "6m0s", "6m1.25s"]
