"""POST /api/util/msgs/{ispb}/{number}: the test-data helper route."""

from __future__ import annotations

from collections.abc import Callable

import psycopg
import pytest
from flask import Flask
from flask.testing import FlaskClient

from problems import assert_problem


def count(db: psycopg.Connection, ispb: str | None = None) -> int:
    if ispb is None:
        (n,) = db.execute("SELECT count(*) FROM pix_message").fetchone()  # type: ignore[misc]
    else:
        (n,) = db.execute(
            "SELECT count(*) FROM pix_message WHERE recipient_ispb = %s", (ispb,)
        ).fetchone()  # type: ignore[misc]
    return int(n)


@pytest.mark.parametrize("number", [1, 7, 2500])
def test_inserts_number_messages(client: FlaskClient, db: psycopg.Connection, number: int) -> None:
    reply = client.post(f"/api/util/msgs/32074986/{number}")
    assert reply.status_code == 201
    assert reply.mimetype == "application/json"
    assert reply.get_json() == {"inserted": number}
    assert count(db, "32074986") == number
    assert count(db) == number


def test_repeated_posts_add_up(client: FlaskClient, db: psycopg.Connection) -> None:
    assert client.post("/api/util/msgs/32074986/3").get_json() == {"inserted": 3}
    assert client.post("/api/util/msgs/60701190/4").get_json() == {"inserted": 4}
    assert client.post("/api/util/msgs/32074986/5").get_json() == {"inserted": 5}
    assert count(db, "32074986") == 8
    assert count(db, "60701190") == 4
    (distinct,) = db.execute("SELECT count(DISTINCT end_to_end_id) FROM pix_message").fetchone()  # type: ignore[misc]
    assert distinct == 12


def test_maximum_is_allowed(make_app: Callable[..., Flask], db: psycopg.Connection) -> None:
    client = make_app(UTIL_MAX_MESSAGES=20).test_client()
    assert client.post("/api/util/msgs/32074986/20").get_json() == {"inserted": 20}
    assert count(db) == 20


@pytest.mark.parametrize("ispb", ["3207498", "3207498a", "abcdefgh", "320749861", "-3207498"])
def test_bad_ispb(client: FlaskClient, db: psycopg.Connection, ispb: str) -> None:
    body = assert_problem(client.post(f"/api/util/msgs/{ispb}/5"), 400)
    assert "ispb" in str(body["detail"]).lower()
    assert count(db) == 0


@pytest.mark.parametrize("number", ["0", "-1", "abc", "1.5", "1e3", "00", "101"])
def test_bad_number(make_app: Callable[..., Flask], db: psycopg.Connection, number: str) -> None:
    client = make_app(UTIL_MAX_MESSAGES=100).test_client()
    body = assert_problem(client.post(f"/api/util/msgs/32074986/{number}"), 400)
    assert "number" in str(body["detail"]).lower()
    assert count(db) == 0


def test_above_default_maximum(client: FlaskClient, db: psycopg.Connection) -> None:
    assert_problem(client.post("/api/util/msgs/32074986/100001"), 400)
    assert_problem(client.post("/api/util/msgs/32074986/99999999999999999999"), 400)
    assert count(db) == 0


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "PATCH"])
def test_wrong_method(client: FlaskClient, db: psycopg.Connection, method: str) -> None:
    reply = client.open("/api/util/msgs/32074986/5", method=method)
    assert_problem(reply, 405)
    assert "POST" in reply.headers["Allow"]
    assert count(db) == 0


def test_disabled_route_is_not_found(
    make_app: Callable[..., Flask], db: psycopg.Connection
) -> None:
    client = make_app(UTIL_ROUTES=False).test_client()
    assert_problem(client.post("/api/util/msgs/32074986/5"), 404)
    assert_problem(client.get("/api/util/msgs/32074986/5"), 404)
    assert count(db) == 0
    # The rest of the service is still there.
    assert client.get("/healthz").status_code == 200
