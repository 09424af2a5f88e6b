"""gzip levels: bytes and CPU per answer of ten messages, to choose the service's level.

Renders batches of ten generated messages exactly as an answer carries them
(``pix_message_document`` in PostgreSQL, joined into a JSON array), then
compresses each at levels 1 to 9 as the service does (``mtime=0``) and
reports the mean compressed size and the CPU microseconds per answer.

    python bench/gzip_levels.py [--batches 200]

Uses DATABASE_URL when set, else a scratch database on the local server,
else an embedded one. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import time

import psycopg

import _common as c
from pixstream import migrate, store
from pixstream.generator import MessageFactory

ISPB = "32074986"
LEVELS = (1, 3, 5, 6, 9)
REPEAT = 5


def rendered_batches(url: str, batches: int) -> list[bytes]:
    """``batches`` answer bodies of ten messages each, rendered by the database."""
    migrate.upgrade(url)
    with psycopg.connect(url, autocommit=True) as conn:
        with conn.transaction():
            store.copy_messages(conn, list(MessageFactory().rows(ISPB, batches * 10)))
        documents = [
            doc
            for (doc,) in conn.execute(
                "SELECT pix_message_document(m) FROM pix_message m ORDER BY id"
            )
        ]
    return [f"[{','.join(documents[i : i + 10])}]".encode() for i in range(0, len(documents), 10)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=200)
    args = parser.parse_args()
    with c.database() as db:
        bodies = rendered_batches(db.url, args.batches)
    result: dict[str, object] = {
        "bench": "gzip_levels",
        "answers": len(bodies),
        "plain_bytes": round(statistics.mean(len(b) for b in bodies)),
    }
    for level in LEVELS:
        started = time.process_time()
        sizes = [len(gzip.compress(b, compresslevel=level, mtime=0))
                 for b in bodies for _ in range(REPEAT)]  # fmt: skip
        cpu = (time.process_time() - started) / len(sizes)
        result[f"level_{level}"] = {"bytes": round(statistics.mean(sizes)),
                                    "cpu_us": round(cpu * 1e6, 1)}  # fmt: skip
    print(json.dumps(result))


if __name__ == "__main__":
    main()
