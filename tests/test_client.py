"""pixstream.client against a live gunicorn: conservation under faults, handler
failures, shutdown, refusals (429, 503, 410, 401).

Everything is real: gunicorn with gevent workers, PostgreSQL, the client's
own httpx connections. Waiting is on a condition with a deadline; the only
pauses are the ones the client itself takes (Retry-After, backoff).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from _httpcut import CuttingProxy
from _streamkit import insert_messages, new_ispb, wait_for
from conftest import Server, suite_authorization
from pixstream.client import AuthError, Collection, collect, collect_async
from test_faults import EmbeddedPostgres, all_confirmed, children

pytestmark = pytest.mark.server


def token_for(server: Server, ispb: str) -> str | None:
    """The suite's token for ``ispb`` on ``server`` in token mode; None otherwise."""
    header = suite_authorization(server.port, f"/api/pix/{ispb}/stream/start")
    return header["Authorization"].removeprefix("Bearer ") if header else None


class Seen:
    """What the handler finished, batch by batch (thread-safe)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.batches: list[list[str]] = []

    def __call__(self, messages: list[dict[str, Any]]) -> None:
        with self.lock:
            self.batches.append([m["endToEndId"] for m in messages])

    def ids(self) -> list[str]:
        with self.lock:
            return [e2e for batch in self.batches for e2e in batch]


def open_streams(conn: psycopg.Connection, ispb: str) -> int:
    (count,) = conn.execute(
        "SELECT count(*) FROM pix_stream WHERE ispb = %s AND closed_at IS NULL", (ispb,)
    ).fetchone()
    return int(count)


def confirmed(conn: psycopg.Connection, e2e: str) -> bool:
    row = conn.execute(
        "SELECT p.confirmed_at IS NOT NULL FROM pix_message m"
        " LEFT JOIN pix_pull p ON p.id = m.pull_id WHERE m.end_to_end_id = %s",
        (e2e,),
    ).fetchone()
    return bool(row and row[0])


@pytest.fixture(scope="module")
def shared(database_url: str) -> Iterator[Server]:
    """One server for the tests that need no special settings (starting one costs ~4 s).

    A 3 s window, so that the Ctrl-C test can tell a poll cut short from one
    that ended by itself; FAST_SETTINGS' idle time (4 s): servers on one
    database share their sweeps, so an idle time shorter than another test
    server's window would expire that server's long polls.
    """
    server = Server(database_url, LONG_POLL_SECONDS=3)
    yield server
    server.stop()


@pytest.fixture
def own_pg() -> Iterator[tuple[EmbeddedPostgres, str]]:
    """A PostgreSQL of this test's own (it is restarted): embedded in both CI modes."""
    from conftest import with_dbname
    from pixstream import migrate

    pg = EmbeddedPostgres()
    try:
        with psycopg.connect(pg.url, autocommit=True) as conn:
            conn.execute('CREATE DATABASE "pixstream_client"')
        url = with_dbname(pg.url, "pixstream_client")
        migrate.upgrade(url)
        yield pg, url
    finally:
        pg.close()


@pytest.mark.faults
@pytest.mark.once  # its own embedded PostgreSQL, whichever the suite's
def test_conservation_while_workers_die_the_database_restarts_and_answers_are_cut(own_pg):
    pg, url = own_pg
    # Streams outlive the outage, so that nothing needs to expire meanwhile.
    server = Server(url, workers=2, STREAM_IDLE_SECONDS=15)
    proxy = CuttingProxy(server.port)
    ispb, seen, inserted = new_ispb(), Seen(), []
    conn = psycopg.connect(url, autocommit=True)

    def kill_a_worker() -> None:
        workers = children(server.process.pid)
        os.kill(min(workers), signal.SIGKILL)
        wait_for(lambda: len(children(server.process.pid) - workers) == 1, timeout=20,
                 interval=0.05, what="a new worker")  # fmt: skip

    def collected(count: int) -> None:
        wait_for(lambda: len(set(seen.ids())) >= count, timeout=30, interval=0.02,
                 what=f"{count} messages collected")  # fmt: skip

    collection = Collection(proxy.base, ispb, seen, streams=6, token=token_for(server, ispb),
                            timeout=5.0, backoff=(0.05, 0.5))  # fmt: skip
    began = time.monotonic()
    marks: list[tuple[str, float]] = []

    def mark(what: str) -> None:
        marks.append((what, round(time.monotonic() - began, 2)))

    try:
        with collection:
            inserted += insert_messages(conn, ispb, 2000)
            collected(500)
            proxy.cut(8)  # lost answers: the client repeats the same request
            inserted += insert_messages(conn, ispb, 2000)
            kill_a_worker()
            mark("first worker replaced")
            inserted += insert_messages(conn, ispb, 2000)
            collected(5000)
            mark("5000 collected")
            conn.close()
            pg.stop()
            wait_for(lambda: collection.stats.snapshot()["last_error"].startswith("503"),
                     timeout=15, interval=0.02, what="a 503 during the outage")  # fmt: skip
            mark("503 seen")
            pg.start()
            mark("database back")
            conn = psycopg.connect(url, autocommit=True)
            inserted += insert_messages(conn, ispb, 2000)
            kill_a_worker()
            inserted += insert_messages(conn, ispb, 2000)
            mark("second worker replaced")
            collected(10_000)
            mark("10000 collected")
            wait_for(all_confirmed(conn, [ispb], 10_000), timeout=15, interval=0.05,
                     what="every message confirmed")  # fmt: skip
        stats = collection.stats.snapshot()
        ids = seen.ids()
        mark("closed")
        print(f"\nclient stats: {stats}; answers cut: {proxy.cuts}; {marks}")
        assert sorted(ids) == sorted(inserted)  # every message, none twice
        assert open_streams(conn, ispb) == 0  # every stream deleted at exit
        assert proxy.cuts == 8
        assert stats["retries"] >= 8
    finally:
        conn.close()
        proxy.close()
        server.stop()


def test_handler_failure_is_not_confirmed_and_comes_back(shared, db):
    server = shared
    ispb = new_ispb()
    ids = insert_messages(db, ispb, 30)
    poison = ids[14]  # in the second batch: it came with an id, so DELETE gives it back
    seen, failed = Seen(), []

    def handler(messages: list[dict[str, Any]]) -> None:
        batch = [m["endToEndId"] for m in messages]
        if poison in batch and not failed:
            failed.append((time.monotonic(), batch))
            raise RuntimeError("cannot store this batch")
        seen(messages)

    collection = Collection(server.base, ispb, handler, streams=1,
                            token=token_for(server, ispb), backoff=(0.1, 0.2))  # fmt: skip
    with collection:
        wait_for(lambda: set(seen.ids()) == set(ids), timeout=10, what="all 30 handled")
        wait_for(all_confirmed(db, [ispb], 30), timeout=10, what="all confirmed")
    (_failed_at, batch) = failed[0]
    again = next(b for b in seen.batches if poison in b)
    assert set(batch) <= set(again)  # the batch came back, whole
    assert sorted(seen.ids()) == sorted(ids)  # and each message was handled once
    assert collection.stats.handler_errors == 1
    assert "cannot store" in collection.stats.last_error


def test_ctrl_c_deletes_every_stream_at_once_and_confirms_only_finished_work(shared, db):
    server = shared
    ispb = new_ispb()
    seen, gate, holding = Seen(), threading.Event(), threading.Event()

    slow = ""

    def handler(messages: list[dict[str, Any]]) -> None:
        if any(m["endToEndId"] == slow for m in messages):
            holding.set()
            gate.wait(10)  # the handler is busy when Ctrl-C comes
        seen(messages)

    observed: dict[str, Any] = {}

    def observe(started: float) -> None:
        # Five streams were in a long poll: all deleted within a second; the
        # sixth waits for its handler, and its batch is not confirmed meanwhile.
        wait_for(lambda: open_streams(db, ispb) == 1, timeout=3, what="five streams deleted")
        observed["five_deleted_after"] = time.monotonic() - started
        observed["slow_confirmed_early"] = confirmed(db, slow)
        gate.set()

    # Queued first, so that the six starts answer at once (not after the window).
    warm = insert_messages(db, ispb, 60)
    collection = Collection(server.base, ispb, handler, streams=6, token=token_for(server, ispb))
    with collection:
        wait_for(lambda: len(seen.ids()) == 60 and all(c.in_long_poll for c in
                 collection.collectors), timeout=10, what="six long polls")  # fmt: skip
        (slow,) = insert_messages(db, ispb, 1)
        wait_for(holding.is_set, timeout=5, what="the handler to be busy")
        started = time.monotonic()
        observer = threading.Thread(target=observe, args=(started,))
        observer.start()
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
            collection.wait()
    observer.join()
    print(f"\n{observed}")
    assert observed["five_deleted_after"] < 1.0
    assert observed["slow_confirmed_early"] is False
    assert sorted(seen.ids()) == sorted([*warm, slow])
    assert confirmed(db, slow)  # finished, then confirmed by the closing DELETE
    assert open_streams(db, ispb) == 0


class Recorder:
    """Every answer the client got, with its thread, via httpx's event hooks."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.events: list[tuple[int, float, str, str, int, str | None]] = []

    def request(self, request: httpx.Request) -> None:
        request.extensions["sent_at"] = time.monotonic()

    def response(self, response: httpx.Response) -> None:
        request = response.request
        with self.lock:
            self.events.append((threading.get_ident(), request.extensions["sent_at"],
                                request.method, request.url.path, response.status_code,
                                response.headers.get("Retry-After")))  # fmt: skip

    def follow_ups(self, status: int) -> list[tuple[tuple, tuple]]:
        """Each answer with ``status`` and the next request of the same thread."""
        with self.lock:
            events = list(self.events)
        pairs = []
        for i, event in enumerate(events):
            if event[4] != status:
                continue
            after = next((e for e in events[i + 1 :] if e[0] == event[0]), None)
            if after is not None:
                pairs.append((event, after))
        return pairs


def make_token(database_url: str, ispb: str) -> str:
    """A token of ``ispb``, made as an operator would (``pixstream token create``)."""
    from pixstream import db as pixdb
    from pixstream.access import AccessService

    pool = pixdb.make_pool(database_url, max_size=1, timeout=10)
    pool.open()
    try:
        service = AccessService(pool, None)
        _, token = service.create_token(ispb, "client test")
        service.close()
    finally:
        pool.close()
    return token


def test_refusals_401_stops_429_and_503_wait_retry_after_503_repeats(start_server, database_url,
                                                                     db, tmp_path):  # fmt: skip
    # Token mode; two streams allowed (a third start is 429); one long poll at a
    # time (the next one is 503 overloaded). One worker: the limits are its own.
    server = start_server(workers=1, MAX_STREAMS_PER_ISPB=2, MAX_WAITING=1, AUTH="token")
    ispb = new_ispb()

    # 401: the client stops with the service's message; the command exits 3.
    started = time.monotonic()
    with pytest.raises(AuthError) as refused:
        collect(server.base, ispb, lambda m: None, streams=6, token="not-a-real-token")
    assert refused.value.status == 401
    assert "unknown" in str(refused.value)
    assert time.monotonic() - started < 5
    done = run_command(server.base, ispb, tmp_path / "out.jsonl", "--token", "nope")
    assert done.returncode == 3, done.stderr
    assert "401" in done.stderr and "unknown" in done.stderr

    recorder = Recorder()
    hooks = {"request": [recorder.request], "response": [recorder.response]}
    http = httpx.Client(
        timeout=10,
        event_hooks=hooks,
        headers={"Authorization": f"Bearer {make_token(database_url, ispb)}"},
    )
    seen = Seen()
    ids = insert_messages(db, ispb, 5)
    collection = Collection(server.base, ispb, seen, streams=3, http=http)
    try:
        with collection:
            wait_for(lambda: recorder.follow_ups(429) and [p for p in recorder.follow_ups(503)
                     if not p[0][3].endswith("/start")], timeout=20, interval=0.05,
                     what="a 429 and a 503 on a read, each followed by a retry")  # fmt: skip
            wait_for(lambda: set(seen.ids()) == set(ids), timeout=15, what="all handled")
            closing_at = time.monotonic()
    finally:
        http.close()
    for status in (429, 503):
        for (_, at, method, path, _, retry_after), after in recorder.follow_ups(status):
            if after[1] >= closing_at:
                continue  # shutting down: the DELETE does not wait
            assert retry_after is not None and after[1] - at >= int(retry_after) - 0.05, (
                status, retry_after, after)  # fmt: skip
            if status == 503:
                assert (after[2], after[3]) == (method, path)  # the same request again
    assert sorted(seen.ids()) == sorted(ids)


def test_410_opens_a_new_stream_and_the_redelivery_is_deduplicated(shared, db):
    server = shared
    ispb = new_ispb()
    calls: list[list[str]] = []
    auth = suite_authorization(server.port, f"/api/pix/{ispb}/stream/start")

    def handler(messages: list[dict[str, Any]]) -> None:
        calls.append([m["endToEndId"] for m in messages])
        if len(calls) == 2:
            # While the handler works, someone closes the stream with the id
            # that brought this batch: the batch goes back to the queue, and the
            # client's confirming call will get 410.
            (previous,) = db.execute(
                "SELECT replay_pull FROM pix_stream WHERE ispb = %s AND closed_at IS NULL", (ispb,)
            ).fetchone()
            gone = httpx.delete(f"{server.base}/api/pix/{ispb}/stream/{previous}", headers=auth)
            assert gone.status_code == 200

    collection = Collection(server.base, ispb, handler, streams=1, token=token_for(server, ispb))
    with collection:
        # A first message, so that the start answers at once (not after the window).
        (first,) = insert_messages(db, ispb, 1)
        wait_for(lambda: calls and collection.collectors[0].in_long_poll, timeout=5,
                 what="a long poll")  # fmt: skip
        ids = insert_messages(db, ispb, 3)  # delivered to that poll: it has a previous id
        wait_for(lambda: collection.stats.redeliveries == 3 and all_confirmed(db, [ispb], 4)(),
                 timeout=10, interval=0.02, what="the redelivery dropped")  # fmt: skip
    assert calls == [[first], ids]  # the handler saw them once
    assert collection.stats.new_streams == 2
    assert collection.stats.last_error.startswith("410")


def test_collect_async_collects_and_closes_every_stream_on_stop(shared, db):
    server = shared
    ispb = new_ispb()
    ids = insert_messages(db, ispb, 25)
    seen: list[str] = []

    async def handler(messages: list[dict[str, Any]]) -> None:
        seen.extend(m["endToEndId"] for m in messages)

    async def main() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(collect_async(server.base, ispb, handler, streams=3, stop=stop,
                                                 token=token_for(server, ispb)))  # fmt: skip
        deadline = time.monotonic() + 10
        while len(seen) < 25 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)  # polling a condition with a deadline
        stop.set()
        await task

    asyncio.run(main())
    assert sorted(seen) == sorted(ids)
    assert all_confirmed(db, [ispb], 25)()  # the last batches confirmed by the DELETEs
    assert open_streams(db, ispb) == 0


# --------------------------------------------------------------------------- the command

PIXSTREAM = str(Path(sys.executable).with_name("pixstream"))


def command(base: str, ispb: str, out: Path, *extra: str) -> list[str]:
    return [PIXSTREAM, "collect", base, ispb, "--out", str(out), *extra]


def run_command(base: str, ispb: str, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(command(base, ispb, out, *extra), capture_output=True, text=True,
                          timeout=30, env=without_database())  # fmt: skip


def without_database() -> dict[str, str]:
    """The command must not need a database: give it none to find."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIXSTREAM_", "DATABASE"))}
    return {**env, "DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none"}


def lines_of(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True) if path.exists() else []


def test_command_output_survives_kill_9_then_resumes_and_stops_on_sigterm(shared, db, tmp_path):
    server = shared
    ispb = new_ispb()
    out, dedupe = tmp_path / "pix.jsonl", tmp_path / "seen.sqlite"
    token = token_for(server, ispb)
    extra = ["--dedupe-file", str(dedupe), *(["--token", token] if token else [])]
    ids = insert_messages(db, ispb, 1500)

    first = subprocess.Popen(command(server.base, ispb, out, *extra), env=without_database(),
                             stderr=subprocess.DEVNULL)  # fmt: skip
    wait_for(lambda: len(lines_of(out)) >= 300, timeout=20, what="300 lines written")
    first.kill()  # kill -9 in the middle of the collection
    first.wait()
    written = lines_of(out)
    assert all(line.endswith(b"\n") for line in written)  # no torn line
    in_file = {json.loads(line)["endToEndId"] for line in written}
    (confirmed_ids,) = db.execute(
        "SELECT array_agg(m.end_to_end_id) FROM pix_message m JOIN pix_pull p ON p.id = m.pull_id"
        " WHERE m.recipient_ispb = %s AND p.confirmed_at IS NOT NULL",
        (ispb,),
    ).fetchone()
    assert set(confirmed_ids) <= in_file  # fsync before confirm: nothing confirmed is missing
    assert len(in_file) < 1500

    # Started again, it goes on; SIGTERM closes its streams (the killed
    # process's streams stay open until they expire) and exits 0.
    abandoned = {row[0] for row in db.execute(
        "SELECT id FROM pix_stream WHERE ispb = %s AND closed_at IS NULL", (ispb,))}  # fmt: skip
    second = subprocess.Popen(command(server.base, ispb, out, *extra), env=without_database(),
                              stderr=subprocess.PIPE, text=True)  # fmt: skip
    wait_for(lambda: len(lines_of(out)) >= len(written) + 300, timeout=20, what="300 more lines")
    second.send_signal(signal.SIGTERM)
    _, stderr = second.communicate(timeout=10)
    assert second.returncode == 0, stderr
    still_open = {row[0] for row in db.execute(
        "SELECT id FROM pix_stream WHERE ispb = %s AND closed_at IS NULL", (ispb,))}  # fmt: skip
    assert still_open <= abandoned  # every stream of the second process was deleted
    final = [json.loads(line) for line in lines_of(out)]
    (confirmed_ids,) = db.execute(
        "SELECT array_agg(m.end_to_end_id) FROM pix_message m JOIN pix_pull p ON p.id = m.pull_id"
        " WHERE m.recipient_ispb = %s AND p.confirmed_at IS NOT NULL",
        (ispb,),
    ).fetchone()
    assert set(confirmed_ids) <= {m["endToEndId"] for m in final}
    assert {m["endToEndId"] for m in final} <= set(ids)
    assert all(m["recebedor"]["ispb"] == ispb for m in final)
    assert "SIGTERM" in stderr


def test_command_exec_gets_json_lines_on_stdin_and_a_failure_is_not_confirmed(shared, db, tmp_path):
    server = shared
    ispb = new_ispb()
    ids = insert_messages(db, ispb, 15)
    sink, count = tmp_path / "sink.jsonl", tmp_path / "count"
    # The second batch (it came with an id: it is given back at once) fails with
    # exit 1: it must come again; every other one is stored.
    script = (f"n=$(( $(cat {count} 2>/dev/null || echo 0) + 1 )); echo $n > {count};"
              f" if [ $n -eq 2 ]; then cat > /dev/null; exit 1; fi; cat >> {sink}")  # fmt: skip
    token = token_for(server, ispb)
    argv = [PIXSTREAM, "collect", server.base, ispb, "--streams", "1", "--exec", script,
            *(["--token", token] if token else [])]  # fmt: skip
    process = subprocess.Popen(argv, env=without_database(), stderr=subprocess.PIPE, text=True)
    wait_for(all_confirmed(db, [ispb], 15), timeout=20, interval=0.05, what="all confirmed")
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=10)
    assert process.returncode == 0, stderr
    assert "command exited 1" in stderr
    stored = [json.loads(line)["endToEndId"] for line in lines_of(sink)]
    assert sorted(stored) == sorted(ids)  # each once: the failed batch came back whole
    assert open_streams(db, ispb) == 0
