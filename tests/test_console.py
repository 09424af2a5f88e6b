"""The operators' console in-process (Flask's test client): pages, access, actions, gauges.

The browser tests (test_console_browser.py) drive the same pages in Chromium
against gunicorn; these check what a browser cannot see: cookie flags, CSRF
refusals, error formats, the log line of each action, the gauges' values.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable

import psycopg
import pytest
from flask import Flask
from flask.testing import FlaskClient

from _streamkit import insert_messages, new_ispb
from pixstream import metrics
from pixstream.runtime import EXTENSION, Runtime

MULTIPART = "multipart/json"
PAGES = ("/console/", "/console/institutions")


def rt(app: Flask) -> Runtime:
    """The app's runtime, outside a request."""
    return app.extensions[EXTENSION]  # type: ignore[no-any-return]


def csrf(client: FlaskClient, page: str) -> str:
    """The CSRF value of a page's form (the cookie is set by the same answer)."""
    match = re.search(r'name="csrf" value="([^"]+)"', client.get(page).text)
    assert match, page
    return match[1]


def start(client: FlaskClient, ispb: str, headers: dict[str, str] | None = None) -> list[str]:
    """Open a stream and take its first batch (up to 10): the batch's endToEndIds."""
    reply = client.get(
        f"/api/pix/{ispb}/stream/start", headers={"Accept": MULTIPART, **(headers or {})}
    )
    assert reply.status_code == 200, reply.text
    return [doc["endToEndId"] for doc in json.loads(reply.data)]


def open_stream_ids(db: psycopg.Connection, ispb: str) -> list[int]:
    rows = db.execute(
        "SELECT id FROM pix_stream WHERE ispb = %s AND closed_at IS NULL ORDER BY id", (ispb,)
    )
    return [stream_id for (stream_id,) in rows]


def test_pages_render_with_a_banner_when_auth_is_off(client, db):
    ispb = new_ispb()
    insert_messages(db, ispb, 12)
    start(client, ispb)
    for page in (*PAGES, f"/console/institutions/{ispb}"):
        reply = client.get(page)
        assert reply.status_code == 200, page
        assert "Authentication is off" in reply.text
    table = client.get("/console/institutions").text
    assert f">{ispb}</a>" in table
    detail = client.get(f"/console/institutions/{ispb}").text
    assert "Close…" in detail and "unknown" not in detail  # the stream's host is known
    assert client.get("/console/institutions?q=00000000").text.count(f">{ispb}</a>") == 0


def test_overview_json_counts_backlog_streams_and_hosts(app, client, db):
    ispb = new_ispb()
    insert_messages(db, ispb, 15)
    start(client, ispb)  # 10 in flight, 5 queued
    rt(app).console.heartbeat(rt(app).listener)
    data = client.get("/console/api/overview").get_json()
    assert data["backlog"] == 15
    assert data["open_streams"] == 1 and data["stream_limit"] == 6
    assert data["oldest_age"] is not None and data["oldest_age"] >= 0
    assert any(host["alive"] for host in data["hosts"])
    assert len(data["series"]) == 30
    assert sum(point[2] for point in data["series"]) >= 0


def test_bad_input_is_an_html_page_and_api_errors_are_problems(client):
    bad = client.get("/console/institutions/12ab")
    assert bad.status_code == 400 and bad.mimetype == "text/html"
    assert "ispb must be exactly 8 digits" in bad.text
    missing = client.get("/console/no/such/page")
    assert missing.status_code == 404 and missing.mimetype == "text/html"
    wrong_id = client.get("/console/institutions/12345678/streams/abc/close")
    assert wrong_id.status_code == 404 and wrong_id.mimetype == "text/html"
    api = client.get("/console/api/nothing")
    assert api.status_code == 404 and api.mimetype == "application/problem+json"


def test_close_stream_needs_csrf_and_gives_the_batch_to_another_stream(client, db, caplog):
    ispb = new_ispb()
    sent = insert_messages(db, ispb, 10)
    held = start(client, ispb)
    assert sorted(held) == sorted(sent)
    (stream_id,) = open_stream_ids(db, ispb)
    action = f"/console/institutions/{ispb}/streams/{stream_id}/close"

    confirm = client.get(action)
    assert confirm.status_code == 200 and "Yes, close it" in confirm.text
    refused = client.post(action, data={"csrf": "forged"})
    assert refused.status_code == 400 and open_stream_ids(db, ispb) == [stream_id]

    token = csrf(client, action)
    with caplog.at_level(logging.INFO, logger="pixstream"):
        done = client.post(action, data={"csrf": token})
    assert done.status_code == 302 and "released=10" in done.headers["Location"]
    shown = client.get(done.headers["Location"]).text
    assert "Stream 1 closed; 10 message(s) back to the queue." in shown
    assert open_stream_ids(db, ispb) == []
    assert any("closed stream" in r.getMessage() and "anonymous" in r.getMessage()
               for r in caplog.records)  # fmt: skip
    assert sorted(start(client, ispb)) == sorted(sent)  # redelivered, to a new stream
    again = client.post(action, data={"csrf": token})
    assert again.status_code == 404 and "no open stream" in again.text


def test_revoke_a_credential_from_the_console(app, client, db, caplog):
    ispb = new_ispb()
    info, _ = rt(app).access.create_token(ispb, "bank collector")
    page = client.get(f"/console/institutions/{ispb}").text
    assert "bank collector" in page and "Revoke…" in page
    action = f"/console/institutions/{ispb}/credentials/{info.id}/revoke"
    token = csrf(client, action)
    with caplog.at_level(logging.INFO, logger="pixstream"):
        assert client.post(action, data={"csrf": token}).status_code == 302
    assert rt(app).access.get_credential(info.id).revoked_at is not None
    assert any("revoked credential" in r.getMessage() for r in caplog.records)
    # Another ISPB's credential is not this page's to revoke.
    other = f"/console/institutions/{new_ispb()}/credentials/{info.id}/revoke"
    assert client.get(other).status_code == 404


@pytest.fixture
def token_app(make_app: Callable[..., Flask]) -> Flask:
    return make_app(AUTH="token")


def test_with_auth_on_only_an_admin_token_opens_the_console(token_app, db):
    client = token_app.test_client()
    _, admin = rt(token_app).access.create_token(None, "operator", admin=True)
    _, bank = rt(token_app).access.create_token(new_ispb(), "a bank")

    assert client.get("/console/").status_code == 302
    assert "/console/login" in client.get("/console/institutions").headers["Location"]
    api = client.get("/console/api/overview")
    assert api.status_code == 401 and api.mimetype == "application/problem+json"

    login = csrf(client, "/console/login")
    refused = client.post("/console/login", data={"csrf": login, "token": bank})
    assert refused.status_code == 401 and "not an administrator" in refused.text
    assert client.post("/console/login", data={"csrf": "x", "token": admin}).status_code == 400
    reply = client.post("/console/login", data={"csrf": login, "token": admin, "next": "//evil"})
    assert reply.status_code == 302 and reply.headers["Location"] == "/console/"
    cookie = next(c for c in reply.headers.getlist("Set-Cookie") if "pixstream_console=" in c)
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Secure" not in cookie

    for page in PAGES:
        shown = client.get(page)
        assert shown.status_code == 200 and "Authentication is off" not in shown.text
        assert "admin credential" in shown.text  # who is logged in
    assert client.get("/console/api/overview").status_code == 200

    secure = token_app.test_client()
    over_tls = secure.post(
        "/console/login", base_url="https://localhost",
        data={"csrf": csrf(secure, "/console/login"), "token": admin},
    )  # fmt: skip
    assert "Secure" in next(c for c in over_tls.headers.getlist("Set-Cookie") if "console=" in c)


def test_gauges_come_from_the_sweeper_with_the_top_ispbs(make_app, db):
    app = make_app(METRICS_TOP_ISPBS=2)
    big, middle, small = new_ispb(), new_ispb(), new_ispb()
    for ispb, count in ((big, 30), (middle, 20), (small, 5)):
        insert_messages(db, ispb, count)
    rt(app).console.refresh_gauges()
    assert metrics.local_value(metrics.BACKLOG) == 55
    assert metrics.local_value(metrics.OLDEST_UNCONFIRMED) > 0
    exposed = app.test_client().get("/metrics").text
    assert f'pixstream_ispb_backlog_messages{{ispb="{big}"}} 30.0' in exposed
    assert f'pixstream_ispb_backlog_messages{{ispb="{middle}"}} 20.0' in exposed
    assert f'pixstream_ispb_backlog_messages{{ispb="{small}"}}' not in exposed
    db.execute("DELETE FROM pix_message WHERE recipient_ispb = %s", (big,))
    rt(app).console.refresh_gauges()
    exposed = app.test_client().get("/metrics").text
    assert f'pixstream_ispb_backlog_messages{{ispb="{big}"}} 0.0' in exposed  # left the top
    assert metrics.local_value(metrics.BACKLOG) == 25


def test_a_silent_process_is_reported_dead(app, client, db):
    rt(app).console.heartbeat(rt(app).listener)
    db.execute(
        "INSERT INTO pix_process (id, host, pid, started_at, seen_at, listener_connected)"
        " VALUES ('gone-host:1', 'gone-host', 1, now() - interval '1 hour',"
        " now() - interval '10 minutes', true)"
        " ON CONFLICT (id) DO UPDATE SET seen_at = excluded.seen_at"
    )
    hosts = {h["name"]: h for h in client.get("/console/api/overview").get_json()["hosts"]}
    assert hosts["gone-host"]["alive"] is False and hosts["gone-host"]["listener"] == "silent"
    assert any(h["alive"] for name, h in hosts.items() if name != "gone-host")
