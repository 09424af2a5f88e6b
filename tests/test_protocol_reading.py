"""Contract tests for protocol.md, "Message body" and "Reading".

One test (or parametrised case) per rule. The Flask test client is used
wherever concurrency does not matter; the one rule about waking a waiting read
runs against a real gunicorn.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable
from datetime import datetime
from decimal import Decimal
from itertools import pairwise
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from httpclient import HttpClient, Reply
from problems import assert_problem

ISPB = "32074986"
OTHER = "60701190"
START = f"/api/pix/{ISPB}/stream/start"
SINGLE = "application/json"
MULTIPART = "multipart/json"
PULL_NEXT = re.compile(r"/api/pix/(?P<ispb>[0-9]{8})/stream/(?P<id>[a-z0-9]{12,})")

# A short long-poll window for the tests that wait for a 204. The pool timeout
# must stay under the window + 2 s (config validation).
SHORT_WINDOW = {"LONG_POLL_SECONDS": 0.3, "STREAM_IDLE_SECONDS": 10, "POOL_TIMEOUT_SECONDS": 1}

MESSAGE_FIELDS = {
    "endToEndId",
    "valor",
    "pagador",
    "recebedor",
    "campoLivre",
    "txId",
    "dataHoraPagamento",
}
PARTY_FIELDS = {"nome", "cpfCnpj", "ispb", "agencia", "contaTransacional", "tipoConta"}


# -- helpers -----------------------------------------------------------------


def queue(client: FlaskClient, ispb: str, number: int) -> None:
    response = client.post(f"/api/util/msgs/{ispb}/{number}")
    assert response.status_code == 201, response.data
    assert response.get_json() == {"inserted": number}


def read(client: FlaskClient, path: str, accept: str | None = None) -> Any:
    headers = {} if accept is None else {"Accept": accept}
    return client.get(path, headers=headers)


def pull_next(response: Any, ispb: str = ISPB) -> str:
    value = response.headers.get("Pull-Next")
    assert value is not None, f"{response.status_code} without Pull-Next"
    match = PULL_NEXT.fullmatch(value)
    assert match is not None, f"Pull-Next {value!r} is not /api/pix/{{ispb}}/stream/{{id}}"
    assert match["ispb"] == ispb
    return value


def end_to_end_ids(response: Any) -> list[str]:
    body = response.get_json()
    messages = body if isinstance(body, list) else [body]
    return [message["endToEndId"] for message in messages]


def queued_in_order(db: Any, ispb: str) -> list[str]:
    rows = db.execute(
        "SELECT end_to_end_id FROM pix_message WHERE recipient_ispb = %s ORDER BY id", (ispb,)
    )
    return [end_to_end_id for (end_to_end_id,) in rows]


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``condition`` until it holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


@pytest.fixture
def short_client(make_app: Callable[..., Flask]) -> FlaskClient:
    return make_app(**SHORT_WINDOW).test_client()


# -- Accept: one message or a batch -------------------------------------------


@pytest.mark.parametrize("accept", [None, "", SINGLE, "application/*", "*/*"])
def test_single_message_accept_gives_one_object(client, accept):
    queue(client, ISPB, 3)
    response = read(client, START, accept)
    assert response.status_code == 200
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert isinstance(body, dict), f"Accept {accept!r} must give one object, got {body!r}"
    assert body["recebedor"]["ispb"] == ISPB


def test_single_message_accept_on_continue_gives_one_object(client):
    queue(client, ISPB, 3)
    first = read(client, START, MULTIPART)
    assert first.status_code == 200
    assert len(first.get_json()) == 3
    queue(client, ISPB, 2)
    second = read(client, pull_next(first), SINGLE)
    assert second.status_code == 200
    assert isinstance(second.get_json(), dict)


@pytest.mark.parametrize(("queued", "expected"), [(1, 1), (3, 3), (10, 10), (13, 10)])
def test_multipart_gives_an_array_of_at_most_max_batch(make_app, queued, expected):
    # A long window: an answer well inside it shows the server did not wait to fill the batch.
    client = make_app(LONG_POLL_SECONDS=5, STREAM_IDLE_SECONDS=10).test_client()
    queue(client, ISPB, queued)
    started = time.monotonic()
    response = read(client, START, MULTIPART)
    elapsed = time.monotonic() - started
    assert response.status_code == 200
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert isinstance(body, list)
    assert len(body) == expected
    assert elapsed < 2.5, f"answered after {elapsed:.2f} s: waited to fill the batch"


def test_multipart_continues_in_batches_of_max_batch(client):
    queue(client, ISPB, 23)
    first = read(client, START, MULTIPART)
    second = read(client, pull_next(first), MULTIPART)
    third = read(client, pull_next(second), MULTIPART)
    assert [len(r.get_json()) for r in (first, second, third)] == [10, 10, 3]


def test_max_batch_setting_bounds_the_array(make_app):
    client = make_app(MAX_BATCH=4).test_client()
    queue(client, ISPB, 6)
    first = read(client, START, MULTIPART)
    assert len(first.get_json()) == 4
    second = read(client, pull_next(first), MULTIPART)
    assert len(second.get_json()) == 2


@pytest.mark.parametrize(
    ("accept", "multipart"),
    [
        ("application/json;q=0.5, multipart/json", True),
        ("multipart/json;q=0.1, application/json", False),
        ("application/json;q=0, */*", True),
        ("multipart/json;q=0, */*", False),
        ("text/html, multipart/json;q=0.2", True),
        ("text/html;q=0.9, application/json;q=0.8", False),
        ("application/*;q=0.6, multipart/json;q=0.5", False),
        ("multipart/*", True),
    ],
)
def test_accept_q_values_are_honoured(client, accept, multipart):
    queue(client, ISPB, 3)
    response = read(client, START, accept)
    assert response.status_code == 200
    body = response.get_json()
    if multipart:
        assert isinstance(body, list) and len(body) == 3, body
    else:
        assert isinstance(body, dict), body


UNSUPPORTED = [
    "text/html",
    "image/png",
    "application/xml",
    "text/*",
    "application/json;q=0",
    "multipart/json;q=0",
]


@pytest.mark.parametrize("accept", UNSUPPORTED)
def test_unsupported_accept_on_start_is_406_and_opens_nothing(client, db, accept):
    queue(client, ISPB, 2)
    response = read(client, START, accept)
    assert_problem(response, 406)
    assert "Pull-Next" not in response.headers
    assert db.execute("SELECT count(*) FROM pix_stream").fetchone() == (0,)
    claimed = db.execute("SELECT count(*) FROM pix_message WHERE pull_id IS NOT NULL")
    assert claimed.fetchone() == (0,)


@pytest.mark.parametrize("accept", ["text/html", "image/png"])
def test_unsupported_accept_on_continue_is_406_and_leaves_the_stream_as_it_was(client, db, accept):
    queue(client, ISPB, 3)
    first = read(client, START)
    refused = read(client, pull_next(first), accept)
    assert_problem(refused, 406)
    # The stream did not move: the same id still continues it, and nothing was skipped.
    second = read(client, pull_next(first))
    third = read(client, pull_next(second))
    assert end_to_end_ids(first) + end_to_end_ids(second) + end_to_end_ids(third) == (
        queued_in_order(db, ISPB)
    )


# -- 204 and Pull-Next --------------------------------------------------------


def test_nothing_queued_is_204_without_body_after_the_window(short_client):
    started = time.monotonic()
    response = read(short_client, START)
    elapsed = time.monotonic() - started
    assert response.status_code == 204
    assert response.data == b""
    assert elapsed >= SHORT_WINDOW["LONG_POLL_SECONDS"] * 0.9, f"204 after only {elapsed:.2f} s"
    pull_next(response)


@pytest.mark.parametrize("accept", [None, MULTIPART])
def test_204_on_continue_carries_a_pull_next_that_keeps_working(short_client, accept):
    queue(short_client, ISPB, 1)
    first = read(short_client, START, accept)
    assert first.status_code == 200
    used = pull_next(first)
    empty = read(short_client, used, accept)
    assert empty.status_code == 204
    assert empty.data == b""
    following = pull_next(empty)  # may repeat `used`
    again = read(short_client, following, accept)
    assert again.status_code == 204
    queue(short_client, ISPB, 1)
    last = read(short_client, pull_next(again), accept)
    assert last.status_code == 200
    pull_next(last)


def test_every_200_and_204_carries_a_relative_pull_next(short_client):
    seen = []
    queue(short_client, ISPB, 2)
    first = read(short_client, START)
    second = read(short_client, pull_next(first), MULTIPART)
    third = read(short_client, pull_next(second))
    assert [r.status_code for r in (first, second, third)] == [200, 200, 204]
    for response in (first, second, third):
        value = pull_next(response)
        assert not value.startswith(("http:", "https:", "//"))
        seen.append(value)
    # Each 200 hands out a new id; ids are fresh, not derived from each other.
    assert seen[0] != seen[1]


def test_204_pull_next_may_repeat_the_id_just_used(short_client):
    start = read(short_client, START)
    assert start.status_code == 204
    used = pull_next(start)
    response = read(short_client, used)
    assert response.status_code == 204
    assert pull_next(response) == used


def test_pull_next_ids_are_unguessable(client):
    queue(client, ISPB, 21)
    ids = []
    response = read(client, START)
    for _ in range(20):
        ids.append(PULL_NEXT.fullmatch(pull_next(response))["id"])
        response = read(client, pull_next(response))
    assert len(set(ids)) == len(ids)
    assert all(len(i) >= 12 and re.fullmatch(r"[a-z0-9]+", i) for i in ids)
    # Not a counter or a timestamp: consecutive ids agree in few positions.
    for a, b in pairwise(ids):
        same = sum(1 for x, y in zip(a, b, strict=False) if x == y)
        assert same < min(len(a), len(b)) // 2, (a, b)


# -- whose messages, in which order --------------------------------------------


@pytest.mark.parametrize("accept", [None, MULTIPART])
def test_stream_delivers_only_its_ispb_oldest_first(short_client, db, accept):
    for ispb, number in [(ISPB, 3), (OTHER, 2), (ISPB, 4), (OTHER, 3), (ISPB, 5)]:
        queue(short_client, ispb, number)
    delivered: list[str] = []
    response = read(short_client, START, accept)
    while response.status_code == 200:
        body = response.get_json()
        for message in body if isinstance(body, list) else [body]:
            assert message["recebedor"]["ispb"] == ISPB
        delivered += end_to_end_ids(response)
        response = read(short_client, pull_next(response), accept)
    assert response.status_code == 204
    assert delivered == queued_in_order(db, ISPB)
    # The other ISPB's messages were not touched.
    untouched = db.execute(
        "SELECT count(*) FROM pix_message WHERE recipient_ispb = %s AND pull_id IS NULL", (OTHER,)
    )
    assert untouched.fetchone() == (5,)
    other = read(short_client, f"/api/pix/{OTHER}/stream/start", MULTIPART)
    assert end_to_end_ids(other) == queued_in_order(db, OTHER)
    assert pull_next(other, OTHER)


# -- the message body ------------------------------------------------------------


def _valid_cpf_cnpj(value: str) -> bool:
    if not value.isdigit() or len(value) not in (11, 14) or len(set(value)) == 1:
        return False
    digits = [int(c) for c in value]
    if len(value) == 11:
        weights = [list(range(10, 1, -1)), list(range(11, 1, -1))]
    else:
        weights = [[5, 4, 3, 2, 9, 8, 7, 6, 5, 4, 3, 2], [6, 5, 4, 3, 2, 9, 8, 7, 6, 5, 4, 3, 2]]
    for position, weight in zip((len(value) - 2, len(value) - 1), weights, strict=True):
        remainder = sum(d * w for d, w in zip(digits[:position], weight, strict=True)) % 11
        if digits[position] != (0 if remainder < 2 else 11 - remainder):
            return False
    return True


def test_message_objects_have_exactly_the_protocol_fields(client):
    queue(client, ISPB, 11)
    batch = read(client, START, MULTIPART)
    single = read(client, pull_next(batch))
    messages = [*batch.get_json(), single.get_json()]
    assert len(messages) == 11
    for message in messages:
        assert set(message) == MESSAGE_FIELDS
        assert set(message["pagador"]) == PARTY_FIELDS
        assert set(message["recebedor"]) == PARTY_FIELDS


def test_message_field_formats(client, db):
    queue(client, ISPB, 40)
    raw: list[bytes] = []
    messages: list[dict[str, Any]] = []
    path = START
    for _ in range(4):
        response = read(client, path, MULTIPART)
        raw.append(response.data)
        messages += json.loads(response.data, parse_float=Decimal)
        path = pull_next(response)
    assert len(messages) == 40
    # valor: a JSON number with exactly two decimals on the wire.
    wire_valores = [v for body in raw for v in re.findall(rb'"valor"\s*:\s*([^,}]+)', body)]
    assert len(wire_valores) == 40
    assert all(re.fullmatch(rb"[0-9]+\.[0-9]{2}", v) for v in wire_valores), wire_valores
    stored = dict(db.execute("SELECT end_to_end_id, valor FROM pix_message"))
    for message in messages:
        e2e = message["endToEndId"]
        assert message["valor"] == stored[e2e]  # exact decimal, no float rounding
        assert re.fullmatch(r"E[0-9]{8}[0-9]{12}[A-Za-z0-9]{11}", e2e)
        assert e2e[1:9] == message["pagador"]["ispb"]
        datetime.strptime(e2e[9:21], "%Y%m%d%H%M")  # a real date and time
        assert re.fullmatch(
            r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{3}Z",
            message["dataHoraPagamento"],
        )
        datetime.fromisoformat(message["dataHoraPagamento"].replace("Z", "+00:00"))
        assert message["recebedor"]["ispb"] == ISPB
        for party in (message["pagador"], message["recebedor"]):
            assert _valid_cpf_cnpj(party["cpfCnpj"]), party
            assert re.fullmatch(r"[0-9]{4}", party["agencia"])
            assert re.fullmatch(r"[0-9]{8}", party["ispb"])
            assert party["tipoConta"] in {"CACC", "SVGS", "SLRY", "TRAN"}
            assert isinstance(party["nome"], str) and party["nome"]
            assert isinstance(party["contaTransacional"], str) and party["contaTransacional"]
        assert isinstance(message["campoLivre"], str)
        assert isinstance(message["txId"], str) and message["txId"]
    assert len({m["endToEndId"] for m in messages}) == 40


# -- a waiting read answers as soon as one message is available ---------------


@pytest.mark.server
def test_waiting_read_answers_as_soon_as_one_message_arrives(start_server, db):
    window = 4.0
    server = start_server(LONG_POLL_SECONDS=window, STREAM_IDLE_SECONDS=12)
    replies: list[Reply] = []
    answered = threading.Event()

    def collect() -> None:
        http = HttpClient(server.base)
        try:
            replies.append(http.get(START, accept=MULTIPART))
        finally:
            http.close()
            answered.set()

    threading.Thread(target=collect, daemon=True).start()
    # The stream row is committed before the read starts waiting.
    wait_until(
        lambda: db.execute("SELECT count(*) FROM pix_stream").fetchone() == (1,),
        10,
        "the stream to open",
    )
    inserted = time.monotonic()
    assert server.http.post(f"/api/util/msgs/{ISPB}/1").status == 201
    assert answered.wait(window), "the waiting read did not answer within its window"
    latency = time.monotonic() - inserted
    (reply,) = replies
    assert reply.status == 200
    assert len(reply.json()) == 1, "answered with one message, without waiting to fill"
    assert latency < window / 3, f"woken {latency:.2f} s after the insert"
    server.http.close()
