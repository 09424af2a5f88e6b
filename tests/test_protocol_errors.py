"""Contract tests for protocol.md, "Errors": the status of each case and the
RFC 9457 problem document every 4xx carries."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from problems import assert_problem

ISPB = "32074986"
START = f"/api/pix/{ISPB}/stream/start"
SOME_ID = "abcdefghijklmnopqrstuvwx"  # well formed, never issued
BY_ID = f"/api/pix/{ISPB}/stream/{SOME_ID}"

QUICK = {
    "LONG_POLL_SECONDS": 0.3,
    "STREAM_IDLE_SECONDS": 30,
    "POOL_TIMEOUT_SECONDS": 1,
    "UTIL_MAX_MESSAGES": 50,
}


def stream_rows(db: Any) -> int:
    return int(db.execute("SELECT count(*) FROM pix_stream").fetchone()[0])


def message_rows(db: Any) -> int:
    return int(db.execute("SELECT count(*) FROM pix_message").fetchone()[0])


@pytest.fixture
def quick(make_app: Callable[..., Flask]) -> FlaskClient:
    return make_app(**QUICK).test_client()


# -- 400: ispb not exactly 8 digits ------------------------------------------------

BAD_ISPBS = [
    "3207498",  # 7 digits
    "320749861",  # 9 digits
    "3207498a",
    "abcdefgh",
    "32O74986",  # letter O
    "-3207498",
    "3207 498",
    "\uff13\uff12\uff10\uff17\uff14\uff19\uff18\uff16",  # full-width digits
]


@pytest.mark.parametrize("ispb", BAD_ISPBS)
@pytest.mark.parametrize(
    ("method", "route"),
    [("GET", "start"), ("GET", SOME_ID), ("DELETE", SOME_ID)],
    ids=["start", "continue", "delete"],
)
def test_ispb_not_eight_digits_is_400(quick, db, ispb, method, route):
    response = quick.open(f"/api/pix/{ispb}/stream/{route}", method=method)
    assert_problem(response, 400)
    assert "Pull-Next" not in response.headers
    assert stream_rows(db) == 0


@pytest.mark.parametrize("ispb", BAD_ISPBS)
def test_ispb_not_eight_digits_is_400_on_the_util_route(quick, db, ispb):
    assert_problem(quick.post(f"/api/util/msgs/{ispb}/3"), 400)
    assert message_rows(db) == 0


def test_bad_ispb_is_400_whatever_the_accept(quick):
    response = quick.get("/api/pix/3207498/stream/start", headers={"Accept": "multipart/json"})
    assert_problem(response, 400)


# -- the util route: 201 {"inserted": n}, and 400 for a bad number ------------------


@pytest.mark.parametrize("number", [1, 50])
def test_util_route_inserts_number_messages(quick, db, number):
    response = quick.post(f"/api/util/msgs/{ISPB}/{number}")
    assert response.status_code == 201
    assert response.mimetype == "application/json"
    assert response.get_json() == {"inserted": number}
    rows = db.execute("SELECT recipient_ispb, count(*) FROM pix_message GROUP BY 1").fetchall()
    assert rows == [(ISPB, number)]


@pytest.mark.parametrize("number", ["0", "-1", "51", "abc", "1.5", "1e3", "99999999999999"])
def test_util_number_out_of_range_is_400(quick, db, number):
    assert_problem(quick.post(f"/api/util/msgs/{ISPB}/{number}"), 400)
    assert message_rows(db) == 0


# -- 405: wrong method on a known route ------------------------------------------

WRONG_METHODS = [
    ("POST", START),
    ("PUT", START),
    ("PATCH", START),
    ("DELETE", START),
    ("HEAD", START),
    ("PUT", BY_ID),
    ("POST", BY_ID),
    ("PATCH", BY_ID),
    ("HEAD", BY_ID),
    ("GET", f"/api/util/msgs/{ISPB}/3"),
    ("PUT", f"/api/util/msgs/{ISPB}/3"),
    ("DELETE", f"/api/util/msgs/{ISPB}/3"),
]


def _allow(response: Any) -> set[str]:
    header = response.headers.get("Allow")
    assert header, "a 405 carries Allow"
    return {method.strip().upper() for method in header.split(",")}


@pytest.mark.parametrize(("method", "path"), WRONG_METHODS)
def test_wrong_method_is_405_with_allow(quick, db, method, path):
    response = quick.open(path, method=method)
    assert_problem(response, 405, body=method != "HEAD")
    allowed = _allow(response)
    assert method not in allowed
    assert ("POST" if "/util/" in path else "GET") in allowed
    # Refused before doing anything: no stream opened, no message inserted.
    assert stream_rows(db) == 0
    assert message_rows(db) == 0


def _methods_in_allow_that_answer_405(client: FlaskClient, method: str, path: str) -> list[str]:
    """The methods a 405's Allow advertises that the same URL refuses with 405 too."""
    allowed = _allow(client.open(path, method=method)) - {"OPTIONS"}
    return sorted(m for m in allowed if client.open(path, method=m).status_code == 405)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("DELETE", START),
        ("HEAD", BY_ID),
        ("GET", f"/api/util/msgs/{ISPB}/3"),
        ("POST", START),
        ("PUT", START),
        ("PATCH", START),
        ("HEAD", START),
        ("PUT", BY_ID),
        ("POST", BY_ID),
    ],
)
def test_allow_lists_only_methods_the_route_serves(quick, method, path):
    assert _methods_in_allow_that_answer_405(quick, method, path) == []


# -- 404 -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "/nope",
        "/api",
        "/api/pix",
        f"/api/pix/{ISPB}",
        f"/api/pix/{ISPB}/stream",
        f"/api/pix/{ISPB}/stream/",
        f"/api/pix/{ISPB}/stream/start/more",
        f"/api/pix/{ISPB}/stream/{SOME_ID}/more",
        f"/api/util/msgs/{ISPB}",
        "/api/util/msgs",
    ],
)
@pytest.mark.parametrize("method", ["GET", "DELETE", "POST"])
def test_unknown_path_is_404_problem(quick, method, path):
    assert_problem(quick.open(path, method=method), 404)


def test_problem_documents_ignore_the_accept_header(quick):
    for accept in ("text/html", "application/json", "multipart/json"):
        assert_problem(quick.get("/nope", headers={"Accept": accept}), 404)
        assert_problem(quick.post(f"/api/util/msgs/{ISPB}/0", headers={"Accept": accept}), 400)


@pytest.mark.server
def test_server_level_4xx_are_problem_json_too(start_server):
    server = start_server()
    try:
        too_long = server.http.request("GET", f"/api/pix/{ISPB}/stream/{'a' * 5000}", fresh=True)
        assert 400 <= too_long.status < 500
        assert too_long.header("Content-Type") == "application/problem+json", too_long.body
        big_header = server.http.request("GET", START, {"X-Padding": "x" * 9000}, fresh=True)
        assert 400 <= big_header.status < 500
        assert big_header.header("Content-Type") == "application/problem+json", big_header.body
    finally:
        server.http.close()


# -- each status of the table once, in one place -----------------------------------


def test_error_table(make_app):
    client = make_app(**{**QUICK, "MAX_STREAMS_PER_ISPB": 1}).test_client()
    assert client.post(f"/api/util/msgs/{ISPB}/2").status_code == 201
    assert_problem(client.get("/api/pix/1234/stream/start"), 400)
    assert_problem(client.post(f"/api/util/msgs/{ISPB}/0"), 400)
    assert_problem(client.get(START, headers={"Accept": "text/html"}), 406)
    assert_problem(client.get(BY_ID), 404)
    first = client.get(START)
    assert first.status_code == 200
    first_id = first.headers["Pull-Next"].rsplit("/", 1)[-1]
    assert_problem(client.get(f"/api/pix/60701190/stream/{first_id}"), 404)
    refused = client.get(START)
    assert_problem(refused, 429)
    assert refused.headers["Retry-After"].isdigit()
    assert client.delete(first.headers["Pull-Next"]).status_code == 200
    assert_problem(client.get(first.headers["Pull-Next"]), 410)
    assert_problem(client.put(START), 405)
