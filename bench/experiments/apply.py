"""Make a scratch copy of the service with the bench experiments switchable at run time.

    python bench/experiments/apply.py /tmp/benchcopy
    PIXSTREAM_BENCH_ROOT=/tmp/benchcopy BENCHX_ONE_TRIP=1 python bench/capacity.py

Never touches this checkout's src/: it copies src/, gunicorn.conf.py and wsgi.py
to the target, then patches the copy. Each patch finds an anchor in src first
and stops with "anchor not found" when src has moved on. The flags, read per
request:

- BENCHX_ONE_TRIP: a read is one statement (pix_open / pix_continue from
  one_trip.sql) on an autocommit connection: one round trip instead of
  BEGIN + 6-8 statements + COMMIT.
- BENCHX_SYNC_OFF: pooled connections use synchronous_commit=off.
- BENCHX_LAZY_TOUCH (with ONE_TRIP): an empty read rewrites its stream row only
  when replay_pull changes or last_seen_at is older than a quarter of the idle
  window, instead of on every read.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent

ONE_TRIP = """    def _attempt_one_trip(self, ispb, pull_id, batch_size, time_limit, started):
        from psycopg_pool import PoolTimeout

        from pixstream.errors import DatabaseUnavailable

        settings = self.settings
        next_pull = new_pull_id()
        pool = self._pool
        try:
            with db.deadline(time_limit):
                conn = pool.getconn(time_limit)
                try:
                    if pull_id is None:
                        row = conn.execute(
                            "SELECT * FROM pix_open(%s, %s, %s, %s, %s, %s)",
                            (ispb, new_pull_id(), next_pull, batch_size,
                             settings.idle_seconds, settings.max_streams),
                        ).fetchone()
                    else:
                        row = conn.execute(
                            "SELECT * FROM pix_continue(%s, %s, %s, %s, %s, %s)",
                            (ispb, pull_id, next_pull, batch_size, settings.idle_seconds,
                             settings.idle_seconds / 4 if LAZY_TOUCH else 0.0),
                        ).fetchone()
                finally:
                    pool.putconn(conn)
        except PoolTimeout as exc:
            raise DatabaseUnavailable("no database connection could be had in time") from exc
        except psycopg.OperationalError as exc:
            raise DatabaseUnavailable(f"the database did not answer: {exc}") from exc
        outcome, pull_next, documents, confirmed, _, _, _, _ = row
        metrics.CLAIM_DURATION.observe(time.perf_counter() - started)
        if confirmed:
            metrics.MESSAGES_CONFIRMED.inc(confirmed)
        if outcome == "notfound":
            raise StreamNotFound(f"no stream of ISPB {ispb} has the id {pull_id}")
        if outcome == "gone":
            raise StreamGone(f"stream id {pull_id} was superseded, closed or expired")
        if outcome == "refused":
            metrics.STREAMS_REFUSED.inc()
            raise TooManyStreams(
                f"ISPB {ispb} already has {settings.max_streams} open streams",
                retry_after=max(1, round(settings.long_poll_seconds)),
            )
        if pull_id is None:
            metrics.STREAMS_OPENED.inc()
        if documents:
            metrics.MESSAGES_DELIVERED.inc(len(documents))
        return Delivery(pull_next, list(documents))

"""

POOL_OPTIONS = """            **KEEPALIVES,
            **({"autocommit": True} if os.environ.get("BENCHX_ONE_TRIP") else {}),
            **(
                {"options": "-c synchronous_commit=off"}
                if os.environ.get("BENCHX_SYNC_OFF")
                else {}
            ),
        },
"""


def lines(indent: int, *rows: str) -> str:
    return "".join(" " * indent + row + "\n" for row in rows)


def patch(path: Path, old: str, new: str) -> None:
    text = path.read_text(encoding="utf-8")
    if old not in text:
        raise SystemExit(f"{path}: anchor not found (src changed?): {old[:70]!r}")
    path.write_text(text.replace(old, new, 1), encoding="utf-8")


def main() -> None:
    target = Path(sys.argv[1]).resolve()
    if target == ROOT:
        raise SystemExit("refusing to patch this checkout: give a scratch directory")
    target.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(target / "src", ignore_errors=True)
    shutil.copytree(ROOT / "src", target / "src")
    for name in ("gunicorn.conf.py", "wsgi.py"):
        shutil.copy(ROOT / name, target / name)
    pkg = target / "src" / "pixstream"
    shutil.copy(HERE / "one_trip.sql", pkg / "sql" / "migrations" / "9999_bench_one_trip.sql")

    database = pkg / "db.py"
    patch(database, lines(12, "**KEEPALIVES,") + lines(8, "},"), POOL_OPTIONS)

    streams = pkg / "streams.py"
    patch(streams, "import logging\n", "import logging\nimport os\n")
    patch(streams, "log = logging.getLogger(__name__)\n",
          "log = logging.getLogger(__name__)\n"
          'LAZY_TOUCH = bool(os.environ.get("BENCHX_LAZY_TOUCH"))\n')  # fmt: skip
    started = lines(8, "started = time.perf_counter()")
    one_trip = lines(
        8,
        'if os.environ.get("BENCHX_ONE_TRIP"):',
        "    return self._attempt_one_trip(ispb, pull_id, batch_size, time_limit, started)",
    )
    patch(streams, started, started + one_trip)
    patch(streams, "    def _open(\n", ONE_TRIP + "    def _open(\n")
    print(f"patched copy in {target}")


if __name__ == "__main__":
    main()
