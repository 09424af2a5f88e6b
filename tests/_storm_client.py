"""Impatient collectors for tests/test_storm.py, run as a process of their own.

    python _storm_client.py BASE AUTH_JSON ISPB...   (AUTH_JSON: {ispb: headers})

Opens one keep-alive connection per ISPB listed (list an ISPB six times for
six collectors) and prints ``ready``; on ``go`` (stdin) every collector sends
``stream/start`` at once and follows Pull-Next. An error is repeated after
0.8-1.2 s whatever Retry-After says (a 503 on a continuation repeats the same
URL, as the contract allows; on a start, it repeats the start). On ``stop``
each collector finishes its current request and closes its stream with the
latest id (which confirms the last batch). Prints one JSON document: every
answer's status and duration, and the endToEndIds each collector received.
"""

from gevent import monkey

monkey.patch_all()

import json  # noqa: E402
import random  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import gevent  # noqa: E402
from gevent.event import Event  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from httpclient import HttpClient  # noqa: E402

base, auth = sys.argv[1], json.loads(sys.argv[2])
ispbs = sys.argv[3:]
clients = [HttpClient(base, timeout=30) for _ in ispbs]
for client in clients:
    assert client.get("/healthz").status == 200  # connected: the storm is requests only
go, stop = Event(), Event()
answers: list[tuple[int, float, bool]] = []  # (status, seconds, was a start)
# The detail of each error answer, counted: of the reads, of the closes.
problems: dict[str, int] = {}
close_problems: dict[str, int] = {}
received: list[list[str]] = [[] for _ in ispbs]
closed: list[int | None] = [None] * len(ispbs)


def collect(i: int) -> None:
    ispb, client = ispbs[i], clients[i]
    headers = {"Accept": "multipart/json", **auth.get(ispb, {})}
    start = f"/api/pix/{ispb}/stream/start"
    path = start
    go.wait()
    while True:
        sent = time.perf_counter()
        try:
            reply = client.request("GET", path, headers)
        except OSError:
            continue  # the same request again, on a new connection
        answers.append((reply.status, time.perf_counter() - sent, path == start))
        if reply.status == 200:
            received[i].extend(doc["endToEndId"] for doc in reply.json())
        elif reply.status != 204:
            note(reply, problems)
            gevent.sleep(random.uniform(0.8, 1.2))
            continue
        path = reply.pull_next or path
        if stop.is_set() and path != start:
            while True:
                reply = client.request("DELETE", path, auth.get(ispb, {}))
                closed[i] = reply.status
                if reply.status != 503:
                    return
                note(reply, close_problems)
                gevent.sleep(random.uniform(0.8, 1.2))  # the same DELETE is safe to repeat


def note(reply, counts: dict[str, int]) -> None:
    detail = f"{reply.status} {reply.json().get('detail', '')}"
    counts[detail] = counts.get(detail, 0) + 1


def command() -> str:
    """The next line of stdin, read off the hub: a plain read would block every greenlet."""
    return gevent.get_hub().threadpool.apply(sys.stdin.readline)


collectors = [gevent.spawn(collect, i) for i in range(len(ispbs))]
print("ready", flush=True)
command()
go.set()
command()
stop.set()
gevent.joinall(collectors, timeout=60)
print(
    json.dumps(
        {
            "answers": answers,
            "problems": problems,
            "close_problems": close_problems,
            "received": received,
            "closed": closed,
        }
    ),
    flush=True,
)
