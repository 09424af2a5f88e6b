"""Operations: metrics move with the traffic, logs name stream events, request ids."""

from __future__ import annotations

import json
import re
from collections.abc import Callable

import pytest
from flask import Flask
from flask.testing import FlaskClient

ISPB = "32074986"
MULTIPART = {"Accept": "multipart/json"}


def scrape(client: FlaskClient) -> dict[str, float]:
    """The unlabelled and labelled samples of /metrics, by their full name."""
    reply = client.get("/metrics")
    assert reply.status_code == 200
    assert reply.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    samples = {}
    for line in reply.get_data(as_text=True).splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def delta(before: dict[str, float], after: dict[str, float], name: str) -> float:
    return after.get(name, 0.0) - before.get(name, 0.0)


def test_metrics_follow_a_stream(client: FlaskClient) -> None:
    before = scrape(client)
    assert client.post(f"/api/util/msgs/{ISPB}/12").status_code == 201
    first = client.get(f"/api/pix/{ISPB}/stream/start", headers=MULTIPART)
    second = client.get(first.headers["Pull-Next"], headers=MULTIPART)
    assert len(first.get_json()) + len(second.get_json()) == 12
    assert client.delete(second.headers["Pull-Next"]).status_code == 200
    after = scrape(client)

    assert delta(before, after, "pixstream_messages_inserted_total") == 12
    assert delta(before, after, "pixstream_messages_delivered_total") == 12
    assert delta(before, after, "pixstream_messages_confirmed_total") == 12
    assert delta(before, after, "pixstream_streams_opened_total") == 1
    assert delta(before, after, "pixstream_streams_closed_total") == 1
    assert delta(before, after, 'pixstream_long_polls_total{status="200"}') == 2
    assert delta(before, after, "pixstream_claim_duration_seconds_count") >= 2
    assert after["pixstream_pool_connections_in_use"] == 0
    assert after["pixstream_waiting_requests"] == 0


def test_metrics_count_refusals_and_requeues(make_app: Callable[..., Flask]) -> None:
    client = make_app(MAX_STREAMS_PER_ISPB=1).test_client()
    before = scrape(client)
    assert client.post(f"/api/util/msgs/{ISPB}/3").status_code == 201
    first = client.get(f"/api/pix/{ISPB}/stream/start")
    second = client.get(first.headers["Pull-Next"])
    assert client.get(f"/api/pix/{ISPB}/stream/start").status_code == 429
    # DELETE with the id before the latest: the unseen batch goes back.
    assert client.delete(first.headers["Pull-Next"]).status_code == 200
    assert second.status_code == 200
    after = scrape(client)
    assert delta(before, after, "pixstream_streams_refused_total") == 1
    requeued = 'pixstream_messages_requeued_total{reason="deleted_unconfirmed"}'
    assert delta(before, after, requeued) == 1


def test_request_id_is_echoed_or_made(client: FlaskClient) -> None:
    echoed = client.get("/healthz", headers={"X-Request-ID": "collector-7.batch-42"})
    assert echoed.headers["X-Request-ID"] == "collector-7.batch-42"
    made = client.get("/healthz", headers={"X-Request-ID": "bad id\twith tabs"})
    assert re.fullmatch(r"[0-9a-f]{32}", made.headers["X-Request-ID"])
    assert client.get("/nowhere").headers["X-Request-ID"]  # errors carry one too


def test_json_logs_name_stream_events(
    make_app: Callable[..., Flask], capsys: pytest.CaptureFixture[str]
) -> None:
    client = make_app(LOG_FORMAT="json").test_client()
    capsys.readouterr()
    assert client.post(f"/api/util/msgs/{ISPB}/1").status_code == 201
    first = client.get(f"/api/pix/{ISPB}/stream/start", headers={"X-Request-ID": "rid-1"})
    assert client.delete(first.headers["Pull-Next"]).status_code == 200
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line]
    events = {line["event"]: line for line in lines if "event" in line}
    assert {"opened", "closed"} <= set(events)
    assert events["opened"]["ispb"] == ISPB
    assert isinstance(events["opened"]["stream"], int)
    assert events["opened"]["request_id"] == "rid-1"
    assert events["closed"]["stream"] == events["opened"]["stream"]
