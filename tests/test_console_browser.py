"""The console in a real headless Chromium, served by a real gunicorn, as test_docs_page.py does.

Every page loads without a console error or a failed load; the institutions
table sorts and filters; the overview refreshes by itself; and closing a
stream from its institution's page (link, confirmation, POST) gives its batch
to the next collector. In token mode (PIXSTREAM_TEST_AUTH=token) the browser
logs in with an administrator's token first, through the login form.
Set CONSOLE_SCREENSHOTS=docs to refresh the operations doc's screenshots.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest

from _streamkit import MULTIPART, e2e_ids, insert_messages, new_ispb
from conftest import TEST_AUTH, Server
from test_docs_page import Browser, browser  # noqa: F401 - the fixture

pytestmark = pytest.mark.server

LOADED = "document.readyState === 'complete'"


def until(page: Browser, condition: str, timeout_ms: int = 10000) -> None:
    """Wait, in the page, until the JavaScript ``condition`` holds (or fail after the timeout)."""
    page.evaluate(
        "new Promise((resolve, reject) => {"
        f"  const deadline = Date.now() + {timeout_ms};"
        "  const check = () => {"
        f"    if ({condition}) resolve(true);"
        "    else if (Date.now() > deadline) reject(new Error('timed out: ' + "
        f"{json.dumps(condition)} + '\\n' + document.body.innerText));"
        "    else setTimeout(check, 50);"
        "  };"
        "  check();"
        "})"
    )


def follow(page: Browser, click: str) -> None:
    """Run ``click`` (a link or a submit) and wait for the next page's load."""
    since = len(page.events)
    page.evaluate(click)
    page.wait_for(
        lambda event: (
            event.get("method") == "Page.lifecycleEvent" and event["params"]["name"] == "load"
        ),
        since=since,
    )
    until(page, LOADED)


def admin_token(database_url: str) -> str:
    """A new administrator's token in the server's database."""
    from pixstream import db
    from pixstream.access import AccessService

    pool = db.make_pool(database_url, max_size=1, timeout=10)
    pool.open()
    try:
        service = AccessService(pool, None)
        try:
            return service.create_token(None, "console test", admin=True)[1]
        finally:
            service.close()
    finally:
        pool.close()


def log_in(page: Browser, server: Server) -> None:
    """In token mode, through the login form; with auth off there is nothing to do."""
    page.open(f"{server.base}/console/")
    if TEST_AUTH != "token":
        return
    until(page, "document.getElementById('login')")
    token = admin_token(server.database_url)
    page.evaluate(f"document.querySelector('[name=token]').value = {json.dumps(token)}")
    follow(page, "document.querySelector('#login button').click()")
    until(page, "location.pathname === '/console/'")


def shoot(page: Browser, tmp_path: Path, name: str) -> None:
    page.screenshot(tmp_path / name)
    if target := os.environ.get("CONSOLE_SCREENSHOTS"):
        shutil.copyfile(tmp_path / name, Path(target) / name)


def column(page: Browser, index: int) -> list[Any]:
    return page.evaluate(  # type: ignore[no-any-return]
        "Array.from(document.querySelectorAll('#institutions tbody tr'))"
        f".filter(row => !row.hidden).map(row => row.cells[{index}].dataset.value)"
    )


def test_console_pages_sort_refresh_and_close_a_stream(
    # The server first: torn down after the browser, whose keep-alive
    # connections would otherwise hold gunicorn's graceful stop.
    start_server: Callable[..., Server],
    browser: Browser,  # noqa: F811 - the fixture imported above
    db: psycopg.Connection,
    tmp_path: Path,
) -> None:
    server = start_server(STREAM_IDLE_SECONDS=60)  # the held batch must outlive the visit
    ispb, other, third = new_ispb(), new_ispb(), new_ispb()
    sent = insert_messages(db, ispb, 12)
    insert_messages(db, other, 30)
    insert_messages(db, third, 3)
    held = server.http.get(f"/api/pix/{ispb}/stream/start", accept=MULTIPART)
    assert e2e_ids(held) == sent[:10]

    log_in(browser, server)
    until(browser, "document.querySelectorAll('#chart polyline').length === 3")
    until(browser, "document.querySelector('[data-field=backlog]').textContent === '45'")
    # The overview refreshes by itself (every 5 s), with the hosts' heartbeats.
    until(browser, "document.getElementById('refreshed').textContent.startsWith('refreshed at ')")
    until(browser, "document.querySelector('#hosts td.ok')")
    assert browser.errors() == []
    shoot(browser, tmp_path, "console-overview.png")

    browser.open(f"{server.base}/console/institutions")
    until(browser, LOADED)
    assert sorted(column(browser, 0)) == sorted([ispb, other, third])
    browser.evaluate("document.querySelectorAll('#institutions th')[1].click()")  # backlog
    assert [int(v) for v in column(browser, 1)] == [3, 12, 30]
    browser.evaluate("document.querySelectorAll('#institutions th')[1].click()")
    assert [int(v) for v in column(browser, 1)] == [30, 12, 3]
    assert column(browser, 0)[0] == other
    browser.evaluate("document.querySelectorAll('#institutions th')[0].click()")  # ISPB
    assert column(browser, 0) == sorted([ispb, other, third])
    browser.evaluate(
        "const box = document.getElementById('search');"
        f"box.value = {json.dumps(third)}; box.dispatchEvent(new Event('input'))"
    )
    assert column(browser, 0) == [third]
    browser.evaluate(
        "const search = document.getElementById('search');"
        "search.value = ''; search.dispatchEvent(new Event('input'))"
    )
    assert browser.errors() == []
    shoot(browser, tmp_path, "console-institutions.png")

    browser.open(f"{server.base}/console/institutions/{ispb}")
    until(browser, "document.querySelector('#streams a.button')")
    assert browser.evaluate("document.querySelector('#streams tbody td:nth-child(5)').innerText")
    shoot(browser, tmp_path, "console-institution.png")
    follow(browser, "document.querySelector('#streams a.button').click()")
    until(browser, "document.getElementById('confirm')")
    follow(browser, "document.querySelector('#confirm button').click()")
    until(browser, "document.querySelector('.done')")
    done = browser.evaluate("document.querySelector('.done').innerText")
    assert "10 message(s) back to the queue" in done, done
    assert "No open stream." in browser.evaluate("document.getElementById('streams').innerText")
    assert browser.errors() == []

    # Another collector gets the closed stream's batch: the oldest queued again.
    # Fresh connections: the first one idled past gunicorn's keep-alive meanwhile.
    again = server.http.request(
        "GET", f"/api/pix/{ispb}/stream/start", {"Accept": MULTIPART}, fresh=True
    )
    assert e2e_ids(again) == sent[:10]
    gone = server.http.request("GET", held.pull_next or "", {"Accept": MULTIPART}, fresh=True)
    assert gone.status == 410
