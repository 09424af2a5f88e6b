"""The /docs page in a real headless Chromium, served by a real gunicorn.

Chromium is driven over its DevTools protocol on a pipe (``--remote-debugging-pipe``:
NUL-terminated JSON on file descriptors 3 and 4), so console errors, uncaught
exceptions and failed loads are reported as the events they are, with no
websocket client and no port. Set DOCS_SCREENSHOT=docs/docs-page.png to refresh
the README's screenshot from the same run.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from conftest import skip_without
from pixstream.api.docs import openapi_document

# The same whichever database server and auth mode the suite runs with: CI's
# second pass leaves it out (setup.cfg, marker once).
pytestmark = pytest.mark.once

BINARY = next(
    (path for name in ("chromium", "chromium-browser") if (path := shutil.which(name))), None
)
FLAGS = (
    "--headless",
    "--no-sandbox",  # CI runs as root
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--no-first-run",
    "--no-default-browser-check",
    "--remote-debugging-pipe",
)
STREAM_ROUTE = "/api/pix/{ispb}/stream/start"

# Resolves once the condition holds; rejects on Swagger UI's error box (failed
# fetch or parse, unsupported OpenAPI version) or after 20 s.
UNTIL = """
new Promise((resolve, reject) => {
  const ready = () => %s;
  const check = () => {
    const failed = document.querySelector('.errors-wrapper, .version-pragma');
    if (failed) {
      observer.disconnect();
      reject(new Error(failed.innerText));
    } else if (ready()) {
      observer.disconnect();
      resolve(true);
    }
  };
  const observer = new MutationObserver(check);
  observer.observe(document.documentElement, {childList: true, subtree: true});
  setTimeout(() => {
    observer.disconnect();
    reject(new Error('timed out: ' + document.body.innerText));
  }, 20000);
  check();
})
"""
OPEN_ROWS = "Array.from(document.querySelectorAll('.opblock.is-open %s')).map(row => %s)"


class Browser:
    """One headless Chromium and one page, with every error the page reports."""

    def __init__(self, binary: str, profile: str, log: Any) -> None:
        to_browser_read, to_browser = os.pipe()
        from_browser, from_browser_write = os.pipe()
        # Chromium reads commands on fd 3 and writes answers on fd 4. Move both
        # ends above any fd the child could be handed, then put them in place
        # between fork and exec.
        high = [
            fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
            for fd in (to_browser_read, from_browser_write)
        ]
        for fd in (to_browser_read, from_browser_write):
            os.close(fd)

        def wire_pipes() -> None:
            os.dup2(high[0], 3)
            os.dup2(high[1], 4)

        self.process = subprocess.Popen(
            [binary, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            close_fds=False,  # Python's own fds are close-on-exec; 3 and 4 must survive
            preexec_fn=wire_pipes,
        )  # fmt: skip
        for fd in high:
            os.close(fd)
        self._out, self._in = to_browser, from_browser
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict[str, Any]] = []
        self.session = ""

    def _receive(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([self._in], [], [], remaining)[0]:
                raise TimeoutError("Chromium did not answer in time")
            chunk = os.read(self._in, 1 << 20)
            if not chunk:
                raise RuntimeError("Chromium closed its DevTools pipe")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def send(self, method: str, timeout: float = 30, **params: Any) -> dict[str, Any]:
        """Call a DevTools method (on the page once attached) and return its result."""
        self._next_id += 1
        command: dict[str, Any] = {"id": self._next_id, "method": method, "params": params}
        if self.session and not method.startswith(("Target.", "Browser.")):
            command["sessionId"] = self.session
        os.write(self._out, json.dumps(command).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            message = self._receive(deadline)
            if message.get("id") == self._next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]
            self.events.append(message)

    def wait_for(
        self, predicate: Callable[[dict[str, Any]], bool], *, since: int = 0, timeout: float = 30
    ) -> None:
        """Read events until one (from the ``since``-th on) satisfies ``predicate``."""
        if any(predicate(event) for event in self.events[since:]):
            return
        deadline = time.monotonic() + timeout
        while True:
            event = self._receive(deadline)
            self.events.append(event)
            if predicate(event):
                return

    def open(self, url: str) -> None:
        """Open ``url`` in a 1280x1600 page and wait for its load event."""
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.send("Target.attachToTarget", targetId=target, flatten=True)[
            "sessionId"
        ]
        for domain in ("Runtime", "Log", "Page"):
            self.send(f"{domain}.enable")
        self.send(
            "Emulation.setDeviceMetricsOverride",
            width=1280, height=1600, deviceScaleFactor=1, mobile=False,
        )  # fmt: skip
        self.send("Page.setLifecycleEventsEnabled", enabled=True)
        since = len(self.events)
        navigation = self.send("Page.navigate", url=url)
        assert "errorText" not in navigation, navigation
        # The load of this navigation, not the initial about:blank's.
        self.wait_for(
            lambda event: (
                event.get("method") == "Page.lifecycleEvent"
                and event["params"]["name"] == "load"
                and event["params"]["loaderId"] == navigation["loaderId"]
            ),
            since=since,
        )

    def evaluate(self, expression: str) -> Any:
        """Evaluate JavaScript in the page, awaiting a promise; return its value."""
        result = self.send(
            "Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True
        )
        if "exceptionDetails" in result:
            raise AssertionError(f"page script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def errors(self) -> list[str]:
        """Every console error, uncaught exception and failed load seen so far."""
        found = []
        for event in self.events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.exceptionThrown":
                details = params["exceptionDetails"]
                found.append(details.get("exception", {}).get("description") or details["text"])
            elif method == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert"):
                texts = [arg.get("value", arg.get("description")) for arg in params["args"]]
                found.append("console." + params["type"] + ": " + " ".join(map(str, texts)))
            elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
                entry = params["entry"]
                found.append(f"{entry['source']}: {entry['text']} ({entry.get('url', '')})")
        return found

    def screenshot(self, path: Path) -> None:
        data = self.send("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        try:
            if self.process.poll() is None:
                self.send("Browser.close", timeout=10)
            self.process.wait(10)
        except (OSError, RuntimeError, TimeoutError, subprocess.TimeoutExpired):
            self.process.kill()
            self.process.wait()
        finally:
            os.close(self._out)
            os.close(self._in)


@pytest.fixture
def browser() -> Iterator[Browser]:
    binary = skip_without("chromium", BINARY)  # CI installs the Debian package 'chromium'
    with (
        tempfile.TemporaryDirectory(prefix="pixstream-chromium-") as profile,
        open(Path(profile) / "chromium.log", "wb") as log,
    ):
        opened = Browser(binary, profile, log)
        try:
            yield opened
        finally:
            opened.close()


@pytest.mark.server
def test_docs_page_renders_every_route_without_errors(browser, server, tmp_path):
    openapi = json.loads(openapi_document())
    operations = sum(1 for item in openapi["paths"].values() for key in item if key != "parameters")
    browser.open(f"{server.base}/docs")
    browser.evaluate(UNTIL % f"document.querySelectorAll('.opblock').length >= {operations}")
    text = browser.evaluate("document.body.innerText")

    assert browser.errors() == []
    assert "pixstream" in text
    for path in openapi["paths"]:
        assert path in text
    assert STREAM_ROUTE in text
    # Every file the page loaded came from this server.
    loaded = browser.evaluate("performance.getEntriesByType('resource').map(e => e.name)")
    assert loaded and all(url.startswith(server.base + "/") for url in loaded), loaded
    browser.screenshot(tmp_path / "docs-page.png")
    if target := os.environ.get("DOCS_SCREENSHOT"):
        shutil.copyfile(tmp_path / "docs-page.png", target)

    # Opened, the start operation shows every parameter and response it documents.
    start = openapi["paths"][STREAM_ROUTE]["get"]
    browser.evaluate(
        f"ui.layoutActions.show(['operations', 'streams', '{start['operationId']}'], true)"
    )
    browser.evaluate(UNTIL % "document.querySelector('.opblock.is-open .responses-table')")
    parameters = browser.evaluate(
        OPEN_ROWS % ("tr[data-param-name]", "row.dataset.paramName + ' ' + row.dataset.paramIn")
    )
    documented = [deref(openapi, parameter) for parameter in start["parameters"]]
    assert parameters == [f"{p['name']} {p['in']}" for p in documented]
    codes = browser.evaluate(OPEN_ROWS % ("tr.response[data-code]", "row.dataset.code"))
    assert codes == list(start["responses"])
    assert browser.errors() == []


def deref(openapi: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    """Follow a local ``$ref`` (``#/components/...``)."""
    while "$ref" in node:
        target: Any = openapi
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        node = target
    return node


def test_the_harness_sees_console_errors_exceptions_and_failed_loads(browser):
    """The check above is only as good as its detector: feed it a broken page."""
    with socket.socket() as closed:  # bound, never listening: connections are refused
        closed.bind(("127.0.0.1", 0))
        missing = f"http://127.0.0.1:{closed.getsockname()[1]}/missing.js"
        page = (
            "<!doctype html><title>broken</title>"
            "<script>console.log('just a log line'); console.error('deliberate error')</script>"
            "<script>undefinedFunction()</script>"
            f"<script src='{missing}'></script>"
        )
        browser.open("data:text/html," + quote(page))
    browser.wait_for(lambda event: event.get("method") == "Log.entryAdded")

    errors = browser.errors()
    assert any("deliberate error" in error for error in errors), errors
    assert any("undefinedFunction is not defined" in error for error in errors), errors
    assert any(error.startswith("network:") and "missing.js" in error for error in errors), errors
    assert not any("just a log line" in error for error in errors), errors
