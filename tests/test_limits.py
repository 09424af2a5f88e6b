"""Unit tests of limits.py: the token bucket, the per-id gate, the waiter cap and the shedder.

Time is a fake clock advanced by hand: nothing here sleeps.
"""

from __future__ import annotations

import threading
import time
from contextlib import ExitStack

import pytest

from pixstream.limits import (
    READ,
    START,
    WOKEN,
    Admission,
    Flooded,
    Gate,
    GateBusy,
    Shed,
    SlotTimeout,
    TokenBucket,
    WaiterCap,
    retry_after_seconds,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_bucket_grants_its_burst_then_refuses_with_the_time_to_the_next_token():
    clock = FakeClock()
    bucket = TokenBucket(rate=4, burst=10, clock=clock)
    assert [bucket.take("a") for _ in range(10)] == [0.0] * 10
    assert bucket.take("a") == pytest.approx(0.25)  # one token every 1/4 s
    clock.now += 0.25
    assert bucket.take("a") == 0.0
    assert bucket.take("a") == pytest.approx(0.25)
    clock.now += 0.1
    assert bucket.take("a") == pytest.approx(0.15)


def test_a_refused_request_costs_no_token():
    clock = FakeClock()
    bucket = TokenBucket(rate=1, burst=1, clock=clock)
    assert bucket.take("a") == 0.0
    for _ in range(5):
        assert bucket.take("a") == pytest.approx(1.0)
    clock.now += 1.0
    assert bucket.take("a") == 0.0


def test_buckets_are_per_key_and_refill_only_up_to_the_burst():
    clock = FakeClock()
    bucket = TokenBucket(rate=1, burst=3, clock=clock)
    for _ in range(3):
        assert bucket.take("a") == 0.0
    assert bucket.take("a") > 0
    assert bucket.take("b") == 0.0  # another ISPB is unaffected
    clock.now += 3600  # an hour idle: still only `burst` tokens
    assert [bucket.take("a") for _ in range(4)][-1] > 0


def test_idle_buckets_do_not_grow_memory_without_bound():
    clock = FakeClock()
    bucket = TokenBucket(rate=10, burst=5, max_keys=100, clock=clock)
    for i in range(10_000):
        bucket.take(f"{i:08d}")
        clock.now += 0.001
    assert len(bucket) <= 100


def test_eviction_drops_full_buckets_first_so_a_refusal_stands():
    clock = FakeClock()
    bucket = TokenBucket(rate=1, burst=2, max_keys=2, clock=clock)
    bucket.take("cold")  # full again after 1 s
    clock.now += 0.6
    bucket.take("hot")
    bucket.take("hot")  # empty
    clock.now += 0.6
    bucket.take("new")  # three keys: the full one ("cold") goes, not "hot"
    assert len(bucket) == 2
    assert bucket.take("hot") > 0


def test_retry_after_is_whole_seconds_at_least_one_never_early():
    assert retry_after_seconds(0.01) == 1
    assert retry_after_seconds(1.0) == 1
    assert retry_after_seconds(1.2) == 2


def test_the_gate_refuses_beyond_its_limit_when_nobody_waits():
    gate = Gate(max_requests=2)
    with ExitStack() as stack:
        stack.enter_context(gate.admit("id"))
        stack.enter_context(gate.admit("id"))
        with pytest.raises(Flooded), gate.admit("id"):
            pass
        with gate.admit("other"):  # other ids are unaffected
            pass
    assert len(gate) == 0  # slots go with their last request
    with gate.admit("id"), gate.admit("id"):
        pass


def test_a_newer_request_releases_the_oldest_waiting_one_instead_of_being_refused():
    gate = Gate(max_requests=2)
    woken: list[str] = []
    with ExitStack() as stack:
        first = stack.enter_context(gate.admit("id"))
        stack.enter_context(first.waiting(lambda: woken.append("first")))
        second = stack.enter_context(gate.admit("id"))
        stack.enter_context(second.waiting(lambda: woken.append("second")))
        third = stack.enter_context(gate.admit("id"))  # a retry: served, not refused
        assert woken == ["first"] and first.released and not second.released
        fourth = stack.enter_context(gate.admit("id"))
        assert woken == ["first", "second"] and second.released
        assert not third.released and not fourth.released
        # Nobody left waiting: a fifth is a flood.
        with pytest.raises(Flooded), gate.admit("id"):
            pass
    assert len(gate) == 0


def test_waiting_below_the_limit_is_never_released():
    """Identical long polls on one id, within the limit, all keep waiting (and all
    get the message): only a request that would exceed the limit releases one."""
    gate = Gate(max_requests=3)
    with ExitStack() as stack:
        tickets = [stack.enter_context(gate.admit("id")) for _ in range(3)]
        for ticket in tickets:
            stack.enter_context(ticket.waiting(lambda: None))
        assert not any(ticket.released for ticket in tickets)


def test_only_one_request_of_an_id_holds_its_turn():
    gate = Gate(max_requests=4)
    with gate.admit("id") as a, gate.admit("id") as b, gate.admit("other") as c:
        with a.exclusive(timeout=1):
            with pytest.raises(GateBusy), b.exclusive(timeout=0):
                pass
            with c.exclusive(timeout=0):  # another id's turn is independent
                pass
        with b.exclusive(timeout=0):
            pass


def test_a_queued_request_gets_the_turn_when_it_is_handed_on():
    gate = Gate(max_requests=4)
    order: list[str] = []
    inside = threading.Event()
    with gate.admit("id") as a, gate.admit("id") as b:

        def second() -> None:
            inside.wait(5)
            with b.exclusive(timeout=5):
                order.append("b")

        thread = threading.Thread(target=second)
        thread.start()
        with a.exclusive(timeout=1):
            inside.set()
            order.append("a")
        thread.join(5)
    assert order == ["a", "b"]


def test_the_waiter_cap_counts_and_refuses_with_a_growing_jittered_retry_after():
    clock = FakeClock()
    cap = WaiterCap(3, window=8, clock=clock, rng=lambda low, high: high)  # worst case
    assert all(cap.try_enter() for _ in range(3))
    assert cap.full() and not cap.try_enter()
    first = cap.refused()
    assert first >= 1
    later = [cap.refused() for _ in range(30)][-1]
    assert later > first  # more refusals, longer back-off
    assert later <= 1 + 4 * 8 + 1  # bounded
    clock.now += 9  # the refusals are out of the window
    assert cap.refused() == first
    cap.leave()
    assert not cap.full() and cap.try_enter()
    low = WaiterCap(3, window=8, clock=clock, rng=lambda low, high: low)
    assert low.refused() == 1


def test_a_result_is_shared_only_with_requests_admitted_before_it_was_published():
    gate = Gate(max_requests=4)
    with gate.admit("id") as leader, gate.admit("id") as follower:
        assert follower.shared() is None
        with leader.exclusive(timeout=1):
            leader.publish("answer")
        with gate.admit("id") as late:
            with follower.exclusive(timeout=1):
                assert follower.shared() == "answer"  # it overlapped the leader
            assert late.shared() is None  # it came after: it asks the database itself
            leader.publish(None)  # e.g. a DELETE went through: nothing to share any more
            assert follower.shared() is None


def _queue_behind(admission: Admission, priority: int, order: list[int]) -> threading.Thread:
    """A thread waiting for a slot of ``admission``; it records ``priority`` when served."""

    def wait() -> None:
        with admission.slot(priority, timeout=10):
            order.append(priority)

    thread = threading.Thread(target=wait)
    waiting = admission.waiting
    thread.start()
    deadline = time.monotonic() + 5
    while admission.waiting == waiting:  # polled with a deadline: the thread has queued
        assert time.monotonic() < deadline, "the waiter never queued"
        time.sleep(0.001)
    return thread


def test_slots_go_to_woken_long_polls_then_reads_then_starts():
    admission = Admission(1, shed_after={})
    order: list[int] = []
    with admission.slot(START, timeout=1):
        threads = [_queue_behind(admission, p, order) for p in (START, READ, START, WOKEN, READ)]
        assert admission.held == 1 and admission.waiting == 5
    for thread in threads:
        thread.join(5)
    assert order == [WOKEN, READ, READ, START, START]
    assert admission.held == 0 and admission.waiting == 0


def test_new_work_is_shed_when_its_expected_wait_is_too_long_starts_first():
    clock = FakeClock()
    admission = Admission(1, shed_after={READ: 0.5, START: 0.25}, clock=clock)
    for _ in range(200):  # a slot is held 0.1 s on average
        with admission.slot(READ, timeout=1):
            clock.now += 0.1
    order: list[int] = []
    with admission.slot(READ, timeout=1):
        threads = [_queue_behind(admission, READ, order) for _ in range(2)]
        assert admission.expected_wait(START) == pytest.approx(0.3, abs=0.01)
        with pytest.raises(Shed), admission.slot(START, timeout=1):
            pass
        threads.append(_queue_behind(admission, READ, order))  # 0.3 s <= 0.5 s
        threads.append(_queue_behind(admission, READ, order))  # 0.4 s
        threads.append(_queue_behind(admission, READ, order))  # 0.5 s
        with pytest.raises(Shed), admission.slot(READ, timeout=1):  # 0.6 s: too long
            pass
        threads.append(_queue_behind(admission, WOKEN, order))  # never shed
    for thread in threads:
        thread.join(5)
    assert order == [WOKEN, READ, READ, READ, READ, READ]


def test_a_slot_not_handed_over_in_time_times_out_and_leaves_the_queue():
    admission = Admission(1, shed_after={})
    with admission.slot(READ, timeout=1):
        with pytest.raises(SlotTimeout), admission.slot(READ, timeout=0.01):
            pass
        assert admission.waiting == 0
    assert admission.held == 0


def test_a_failing_block_still_gives_its_slot_back():
    admission = Admission(1, shed_after={})
    with pytest.raises(RuntimeError), admission.slot(READ, timeout=1):
        raise RuntimeError("the database went away")
    assert admission.held == 0
    with admission.slot(START, timeout=0.01):
        pass


def test_retry_after_spreads_the_refused_over_the_time_to_serve_them():
    clock = FakeClock()
    worst = Admission(1, shed_after={READ: 0.0}, window=2, clock=clock, rng=lambda lo, hi: hi)
    for _ in range(200):  # this process completes 100 slots a second
        with worst.slot(READ, timeout=1):
            clock.now += 0.01
    with worst.slot(READ, timeout=1):  # held: any newcomer would wait
        first = _refusal(worst)
        assert first <= 2  # one refusal: served at once, come back in a second or so
        for _ in range(499):
            _refusal(worst)
        many = _refusal(worst)
        # 501 refused in the window, served at ~100/s: spread over ~5 s, jittered from 1 s.
        assert 5 <= many <= 7, many
        for _ in range(5000):
            many = _refusal(worst)
        assert many == 30  # capped
        clock.now += 3  # the refusals are out of the window; so is the measured rate
        assert _refusal(worst) == 2  # 1 refused at the floor rate of 1 a second
    best = Admission(1, shed_after={READ: 0.0}, clock=clock, rng=lambda lo, hi: lo)
    with best.slot(READ, timeout=1):
        assert all(_refusal(best) == 1 for _ in range(100))  # the jitter's low end


def _refusal(admission: Admission) -> int:
    with pytest.raises(Shed) as refused, admission.slot(READ, timeout=1):
        pass
    return refused.value.retry_after


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("RATE_PER_ISPB", 0),
        ("RATE_PER_ISPB", "fast"),
        ("RATE_BURST", 0),
        ("RATE_BURST", 1.5),
        ("MAX_REQUESTS_PER_ID", 0),
        ("MAX_WAITING", 0),
        ("STREAM_LOCK_TIMEOUT_SECONDS", 0),
        ("SHED_WAIT_SECONDS", 0),
        ("SHED_WAIT_SECONDS", 9),  # longer than the long-poll window (8 s)
    ],
)
def test_invalid_limits_stop_the_service_naming_the_variable(key, value):
    from flask import Config

    from pixstream import config
    from pixstream.errors import ConfigError

    settings = Config(".")
    with pytest.raises(ConfigError, match=f"PIXSTREAM_{key} "):
        config.load(settings, {"DATABASE_URL": "postgresql://x/y", key: value})
