"""The listener thread outlives whatever goes wrong in it.

One LISTEN connection per process wakes every waiting read; if its thread
ended, the process would silently fall back to one claim per long-poll window.
These tests run a real Listener against the test database and break it from
the inside: it must count and log the error, reconnect (a new backend), wake
the ISPBs with queued messages (only those: no herd), and deliver the next
wake-up within milliseconds. Its socket carries the TCP settings that find a
half-open connection within seconds, and its backend a statement_timeout that
stops a stuck wake-up scan before the client would give up on it.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack

import psycopg
import pytest
from prometheus_client import REGISTRY
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from _streamkit import app_name, insert_messages, listener_pids, new_ispb, wait_for
from pixstream.listener import _PROBE_DEADLINE, STATEMENT_TIMEOUT, TCP_SETTINGS, Listener, Wakeup

pytestmark = pytest.mark.faults

MAX_WAKEUP_SECONDS = 0.1


def listener_errors() -> float:
    """pixstream_listener_errors_total of this process (0 before the metric exists)."""
    return REGISTRY.get_sample_value("pixstream_listener_errors_total") or 0.0


@pytest.fixture
def tagged(database_url: str) -> tuple[str, str]:
    """A conninfo whose application_name tags this test's listener alone."""
    name = app_name()
    return make_conninfo(database_url, application_name=name), name


@pytest.fixture
def listener(tagged: tuple[str, str]) -> Iterator[Listener]:
    conninfo, _ = tagged
    listener = Listener(conninfo, probe_seconds=1.0, max_backoff_seconds=0.2)
    listener.start()
    assert listener.wait_connected(5), "the listener never connected"
    yield listener
    listener.stop()


def test_an_exception_in_the_wake_up_path_costs_a_reconnect_not_the_listener(
    listener: Listener,
    tagged: tuple[str, str],
    db: psycopg.Connection,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A waiter whose set() raises (any non-psycopg bug on the listener's
    thread) used to end that thread for good. Now: counted, logged, a new
    connection, every waiter woken, and push works as before."""
    _, name = tagged
    before = wait_for(lambda: listener_pids(db, name), timeout=5, what="the listener's backend")
    errors = listener_errors()
    generation = listener.generation
    broken, other = new_ispb(), new_ispb()

    # Break exactly one waiter's wake-up, once; every other Wakeup is untouched.
    original_set = Wakeup.set
    raised = threading.Event()

    def set_or_raise(self: Wakeup) -> None:
        if self is doomed and not raised.is_set():
            raised.set()
            raise RuntimeError("injected into the wake-up path")
        original_set(self)

    monkeypatch.setattr(Wakeup, "set", set_or_raise)
    caplog.set_level(logging.ERROR, logger="pixstream.listener")

    with listener.subscribe(broken) as doomed, listener.subscribe(other) as bystander:
        insert_messages(db, broken, 1)  # its notification reaches the doomed waiter
        assert raised.wait(5), "the notification never reached the waiter"

        # Logged with its traceback, and counted.
        wait_for(
            lambda: any(
                record.exc_info and "injected" in str(record.exc_info[1])
                for record in caplog.records
            ),
            timeout=5,
            what="the error logged with its traceback",
        )
        wait_for(lambda: listener_errors() == errors + 1, timeout=5, what="the error counted")

        # Reconnected: a new generation, a new backend, the old one gone.
        wait_for(
            lambda: listener.listening_generation() == generation + 1,
            timeout=5,
            what="a new LISTEN connection",
        )
        assert listener.wait_connected(0)
        after = wait_for(
            lambda: (pids := listener_pids(db, name)) and not pids & before and pids,
            timeout=5,
            what="the old backend replaced by a new one",
        )
        assert len(after) == 1, after

        # Notifications may have been lost: the reconnect woke the waiter
        # whose ISPB has a queued message (the one whose wake-up failed), and
        # only it (the other re-checks at the end of its window).
        assert doomed.wait(5), "the reconnect did not wake the failed waiter"
        assert not bystander.wait(0), "woken with nothing queued for it"

        # And push works as before: the next insert wakes its waiter at once.
        for wakeup, ispb in ((bystander, other), (doomed, broken)):
            wakeup.clear()
            started = time.monotonic()
            insert_messages(db, ispb, 1)
            assert wakeup.wait(1), f"no wake-up for {ispb} after the reconnect"
            latency = wakeup.woken_at - started
            assert latency < MAX_WAKEUP_SECONDS, f"woken after {latency * 1000:.0f} ms"

    assert listener_errors() == errors + 1
    assert listener.listening_generation() == generation + 1, "reconnected more than once"


def test_a_reconnect_wakes_only_the_ispbs_with_queued_messages(
    listener: Listener, tagged: tuple[str, str], db: psycopg.Connection, database_url: str
) -> None:
    """No herd after a reconnect: of 3,000 waiters across 500 ISPBs, only the
    six of the one ISPB whose message was inserted unnoticed are woken, within
    100 ms of the new connection; the others sleep on (and re-check at the end
    of their windows), instead of all claiming through the pool at once."""
    _, name = tagged
    ispbs = [new_ispb() for _ in range(500)]
    target = ispbs[250]
    with ExitStack() as stack:
        waiters = {
            ispb: [stack.enter_context(listener.subscribe(ispb)) for _ in range(6)]
            for ispb in ispbs
        }
        # A message whose notification is lost: inserted with triggers off.
        with psycopg.connect(database_url, autocommit=True) as silent:
            silent.execute("SET session_replication_role = replica")
            insert_messages(silent, target, 1)

        generation = listener.generation
        (pid,) = wait_for(lambda: listener_pids(db, name), timeout=5, what="the listener")
        db.execute("SELECT pg_terminate_backend(%s, 5000)", (pid,))
        wait_for(
            lambda: listener.listening_generation() == generation + 1,
            timeout=5,
            interval=0.001,
            what="the listener back",
        )
        reconnected = time.monotonic()  # at most a poll interval after the fact

        for wakeup in waiters[target]:
            assert wakeup.wait(1), "the ISPB with a queued message was not woken"
            latency = wakeup.woken_at - reconnected
            assert latency < MAX_WAKEUP_SECONDS, f"woken {latency * 1000:.0f} ms after"
        # The target's wake-up and any other come from the same pass, done by now.
        woken = {ispb for ispb, group in waiters.items() for w in group if w.wait(0)}
        assert woken == {target}, f"{len(woken)} ISPBs woken"


def test_a_failing_credentials_callback_is_logged_and_the_connection_kept(
    listener: Listener,
    tagged: tuple[str, str],
    db: psycopg.Connection,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A pix_credentials callback that raises is a failure of that callback
    only: logged, and the LISTEN connection (and every waiter) left alone."""
    _, name = tagged
    before = wait_for(lambda: listener_pids(db, name), timeout=5, what="the listener's backend")
    generation, errors = listener.generation, listener_errors()
    called = threading.Event()

    def broken_callback(payload: str) -> None:
        called.set()
        raise RuntimeError(f"injected into the callback for {payload}")

    listener.on_notify("pix_credentials", broken_callback)
    caplog.set_level(logging.ERROR, logger="pixstream.listener")
    ispb = new_ispb()
    with listener.subscribe(ispb) as wakeup:
        db.execute("SELECT pg_notify('pix_credentials', 'some-credential')")
        assert called.wait(5), "the callback was never called"
        started = time.monotonic()
        insert_messages(db, ispb, 1)
        assert wakeup.wait(1), "no wake-up after the failing callback"
        assert wakeup.woken_at - started < MAX_WAKEUP_SECONDS
    assert "notification callback failed" in caplog.text
    assert listener.listening_generation() == generation
    assert listener_pids(db, name) == before
    assert listener_errors() == errors


def own_tcp_socket(local_port: int) -> socket.socket | None:
    """This process's TCP socket bound to ``local_port`` (a dup of it), if any."""
    for name in os.listdir("/proc/self/fd"):
        try:
            if not stat.S_ISSOCK(os.fstat(int(name)).st_mode):
                continue
            sock = socket.socket(fileno=os.dup(int(name)))
        except OSError:
            continue  # closed meanwhile (the listdir's own fd)
        if sock.family in (socket.AF_INET, socket.AF_INET6) and sock.getsockname()[1] == local_port:
            return sock
        sock.close()
    return None


def keepalive_timer_seconds(server_port: int, client_port: int) -> float | None:
    """The server-side socket's keepalive timer, as ``ss`` shows it (None if not shown)."""
    ss = shutil.which("ss")
    if ss is None:
        return None
    out = subprocess.run(
        [
            ss,
            "-Htno",
            "state",
            "established",
            f"( sport = :{server_port} and dport = :{client_port} )",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    match = re.search(r"timer:\(keepalive,(?:(\d+)min)?(?:([\d.]+)sec)?(?:([\d.]+)ms)?", out)
    if match is None:
        return None
    minutes, seconds, millis = (float(group or 0) for group in match.groups())
    return minutes * 60 + seconds + millis / 1000


def test_the_listen_socket_finds_a_half_open_connection_within_seconds(
    tagged: tuple[str, str], db: psycopg.Connection
) -> None:
    """TCP keepalives and tcp_user_timeout are in force on the LISTEN
    connection's own socket (read back with getsockopt), on the server's side
    of it too, and the liveness probe still runs on a quiet channel. A real
    half-open socket (a vanished peer) is not simulated here."""
    conninfo, name = tagged
    if str(conninfo_to_dict(conninfo).get("host", "")).startswith("/"):
        pytest.skip("the test server is reached over a Unix socket: TCP keepalives do not apply")
    listener = Listener(conninfo, probe_seconds=0.3)
    listener.start()
    try:
        assert listener.wait_connected(5)
        (pid,) = wait_for(lambda: listener_pids(db, name), timeout=5, what="the listener's backend")
        generation = listener.generation
        (client_port, server_port) = db.execute(
            "SELECT client_port, inet_server_port() FROM pg_stat_activity WHERE pid = %s", (pid,)
        ).fetchone() or (None, None)
        assert client_port is not None, "the listener's connection is not over TCP"

        # The client's side: libpq applied every setting to the socket.
        sock = own_tcp_socket(client_port)
        assert sock is not None, f"no socket of this process on port {client_port}"
        with sock:
            options = {
                "keepalives": sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
                "keepalives_idle": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
                "keepalives_interval": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
                "keepalives_count": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
                "tcp_user_timeout": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT),
            }
        assert options == TCP_SETTINGS
        # What bounds detection (docs/architecture.md, "Wait"): silence for
        # idle + count x interval, or data unacknowledged for tcp_user_timeout,
        # both shorter than half the 10-s probe interval.
        silence = TCP_SETTINGS["keepalives_idle"] + (
            TCP_SETTINGS["keepalives_count"] * TCP_SETTINGS["keepalives_interval"]
        )
        assert silence <= 5 and TCP_SETTINGS["tcp_user_timeout"] <= 5000

        # The server's side: its keepalive timer on this connection runs in
        # seconds (the system default would show about two hours).
        timer = keepalive_timer_seconds(server_port, client_port)
        if timer is not None:
            assert timer <= 2.5, f"the server's keepalive timer shows {timer} s"

        # The probe still runs on a quiet channel, on the same connection.
        wait_for(
            lambda: (
                db.execute(
                    "SELECT query = 'SELECT 1' FROM pg_stat_activity WHERE pid = %s", (pid,)
                ).fetchone()
                == (True,)
            ),
            timeout=5,
            what="the liveness probe",
        )
        assert listener.listening_generation() == generation
        assert listener_pids(db, name) == {pid}
    finally:
        listener.stop()


def test_a_wake_up_scan_stuck_behind_a_lock_is_stopped_by_the_server(
    listener: Listener,
    tagged: tuple[str, str],
    db: psycopg.Connection,
    database_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The listener's backend carries its own statement_timeout (another
    backend's settings cannot be read, so its effect is watched instead).

    A session holding pix_message locked makes the reconnect's scan wait: the
    server cancels it after STATEMENT_TIMEOUT, under the probe deadline (which
    this process, without gevent, does not even have: nothing else would end
    it). The listener reconnects, and once the lock goes, its next scan wakes
    the waiter whose message was inserted unnoticed."""
    _, name = tagged
    ispb = new_ispb()
    caplog.set_level(logging.WARNING, logger="pixstream.listener")
    with listener.subscribe(ispb) as wakeup:
        with psycopg.connect(database_url, autocommit=True) as silent:
            silent.execute("SET session_replication_role = replica")
            insert_messages(silent, ispb, 1)  # no notification: only a scan finds it
        (pid,) = wait_for(lambda: listener_pids(db, name), timeout=5, what="the listener")
        with psycopg.connect(database_url) as locker:
            locker.execute("LOCK TABLE pix_message IN ACCESS EXCLUSIVE MODE")
            db.execute("SELECT pg_terminate_backend(%s, 5000)", (pid,))
            (started,) = wait_for(
                lambda: db.execute(
                    "SELECT extract(epoch FROM query_start)::float FROM pg_stat_activity"
                    " WHERE application_name = %s AND wait_event_type = 'Lock'",
                    (name,),
                ).fetchone(),
                timeout=5,
                what="the scan waiting for the lock",
            )
            cancelled = wait_for(
                lambda: next(
                    (r for r in caplog.records if "statement timeout" in r.getMessage()), None
                ),
                timeout=_PROBE_DEADLINE + 5,
                what="the scan cancelled by statement_timeout",
            )
            stopped_after = cancelled.created - started
            assert not wakeup.wait(0), "woken although the scan never ran"
            locker.rollback()
        assert STATEMENT_TIMEOUT - 0.05 <= stopped_after < _PROBE_DEADLINE, stopped_after
        assert wakeup.wait(5), "the scan after the lock went did not wake the waiter"
    assert listener.wait_connected(5)
