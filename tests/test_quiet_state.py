"""quiet.QuietPulls and quiet.Touches on their own: what a poll may trust, and for how long."""

from __future__ import annotations

import time

from pixstream.listener import Wakeup
from pixstream.quiet import Quiet, QuietPulls, Touches

ISPB = "12345678"


def quiet(stream_id: int = 1, *, mark: tuple[int, int] = (1, 0), skipped: int = 0) -> Quiet:
    return Quiet(ISPB, stream_id, mark, skipped, until=time.monotonic() + 60)


def take(pulls: QuietPulls, pull_id: str, mark: tuple[int, int] | None = (1, 0)) -> Quiet | None:
    with pulls.trusted(pull_id, ISPB, mark, Wakeup()) as found:
        return found


def test_a_remembered_pull_is_trusted_once_with_the_same_mark():
    pulls = QuietPulls(claim_every=5, capacity=10)
    pulls.remember("a", quiet())
    assert take(pulls, "a") is not None
    assert take(pulls, "a") is None  # taken: the poll leaves a new one, or none


def test_a_notification_since_the_claim_or_a_reconnect_or_another_ispb_is_not_trusted():
    pulls = QuietPulls(claim_every=5, capacity=10)
    for mark in [(1, 1), (2, 0), None]:
        pulls.remember("a", quiet())
        assert take(pulls, "a", mark) is None, mark
    pulls.remember("a", quiet())
    with pulls.trusted("a", "87654321", (1, 0), Wakeup()) as found:
        assert found is None


def test_a_stale_state_is_not_trusted():
    pulls = QuietPulls(claim_every=5, capacity=10)
    pulls.remember("a", Quiet(ISPB, 1, (1, 0), 0, until=time.monotonic() - 1))
    assert take(pulls, "a") is None


def test_every_claim_every_th_poll_claims():
    pulls = QuietPulls(claim_every=3, capacity=10)
    pulls.remember("a", quiet(skipped=1))
    assert take(pulls, "a") is not None
    pulls.remember("a", quiet(skipped=2))  # the third: its next poll claims
    assert take(pulls, "a") is None
    one = QuietPulls(claim_every=1, capacity=10)
    one.remember("a", quiet())
    assert take(one, "a") is None


def test_a_close_drops_the_stream_and_wakes_the_polls_trusting_it():
    pulls = QuietPulls(claim_every=5, capacity=10)
    pulls.remember("a", quiet(stream_id=7))
    pulls.closed("7")
    assert take(pulls, "a") is None
    pulls.remember("b", quiet(stream_id=8))
    wakeup, other = Wakeup(), Wakeup()
    with pulls.trusted("b", ISPB, (1, 0), wakeup) as found:
        assert found is not None
        pulls.closed("9")  # another stream
        pulls.closed("not a number")  # ignored
        assert not wakeup.wait(0)
        pulls.closed("8")
        assert wakeup.wait(0)
    pulls.closed("8")  # after the block: nobody to wake, nothing to fail
    assert not other.wait(0)
    # A poll that claimed before the close and answers after it leaves nothing behind.
    pulls.remember("c", quiet(stream_id=8))
    assert take(pulls, "c") is None


def test_a_new_pull_of_a_stream_replaces_its_old_one_and_the_oldest_go_first():
    pulls = QuietPulls(claim_every=5, capacity=2)
    pulls.remember("a", quiet(stream_id=1))
    pulls.remember("b", quiet(stream_id=1))
    assert len(pulls) == 1 and take(pulls, "a") is None
    pulls.remember("c", quiet(stream_id=2))
    pulls.remember("d", quiet(stream_id=3))
    assert len(pulls) == 2
    assert take(pulls, "b") is None  # the oldest, forgotten
    assert take(pulls, "c") is not None and take(pulls, "d") is not None
    pulls.closed("1")  # its pull was evicted: the index was kept in step


def test_touches_keep_the_latest_due_time_per_stream_and_can_be_given_back():
    touches = Touches()
    assert not touches.pending.is_set()
    touches.add(1, "a", 10.0)
    touches.add(1, "a", 5.0)  # an earlier due time for the same pull: kept the later
    touches.add(2, "b", 3.0)
    assert touches.pending.is_set()
    owed = sorted(touches.take())
    assert owed == [(1, "a", 10.0), (2, "b", 3.0)]
    assert touches.take() == [] and not touches.pending.is_set()
    touches.give_back(owed)
    touches.add(1, "c", 1.0)  # the stream moved on: its new pull counts
    assert sorted(touches.take()) == [(1, "c", 1.0), (2, "b", 3.0)]
