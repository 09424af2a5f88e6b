"""``pixstream collect``: collect an ISPB's messages into a JSON-lines file or a command.

Built on :mod:`pixstream.client` and the standard library only: it loads no
Flask app and opens no database (``pixstream collect`` is dispatched before
the Flask CLI is imported; the client-only distribution installs it as
``pixstream-collect``).

Exit codes: 0 stopped by SIGTERM or Ctrl-C (every stream closed); 2 bad
usage; 3 the service refused the credential (401, 403); 4 the output cannot
be written or the command cannot be run; 5 any other refusal that retrying
cannot fix (e.g. 400).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

from pixstream.client import (
    AuthError,
    ClientError,
    Collection,
    Dedup,
    Message,
    SqliteDedup,
    Stats,
    message_json,
)

EXIT_OK, EXIT_USAGE, EXIT_AUTH, EXIT_OUTPUT, EXIT_REFUSED = 0, 2, 3, 4, 5

log = logging.getLogger("pixstream.collect")


class OutputError(Exception):
    """The output file or command failed: the batch is not confirmed."""


class JsonLinesSink:
    """Appends each batch as JSON lines with one write, then fsync, before it is confirmed.

    One ``os.write`` per batch on a regular file is not torn by a kill -9, so
    every line in the file is complete. A file that ends in a partial line
    (a power loss mid-write) is cut back to its last complete line on open:
    those messages were not confirmed, so they come again.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._repair()

    def _repair(self) -> None:
        size = os.fstat(self._fd).st_size
        if size == 0:
            return
        with open(self.path, "rb") as existing:
            existing.seek(max(0, size - 65536))
            tail = existing.read()
        if tail.endswith(b"\n"):
            return
        keep = size - len(tail) + tail.rfind(b"\n") + 1 if b"\n" in tail else 0
        log.warning("%s ended in a partial line: cut back to %d bytes", self.path, keep)
        os.truncate(self.path, keep)

    def __call__(self, messages: list[Message]) -> None:
        data = "".join(message_json(m) + "\n" for m in messages).encode()
        with self._lock:
            view = memoryview(data)
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
            os.fsync(self._fd)

    def close(self) -> None:
        os.close(self._fd)


class ExecSink:
    """Runs ``/bin/sh -c COMMAND`` per batch with its messages as JSON lines on stdin.

    Exit status 0 means processed (the batch is then confirmed); anything else
    means not processed: the batch is not confirmed and comes again.
    """

    def __init__(self, command: str) -> None:
        self.command = command

    def __call__(self, messages: list[Message]) -> None:
        data = "".join(message_json(m) + "\n" for m in messages).encode()
        result = subprocess.run(self.command, shell=True, input=data, check=False)
        if result.returncode != 0:
            raise OutputError(f"command exited {result.returncode}")

    def close(self) -> None:
        pass


class Status(threading.Thread):
    """A live status line on a terminal; a log line every ``every`` s otherwise."""

    def __init__(self, stats: Stats, stream: TextIO, every: float) -> None:
        super().__init__(daemon=True, name="status")
        self.stats, self.stream, self.every = stats, stream, every
        self.tty = stream.isatty()
        self.done = threading.Event()
        self._last = (time.monotonic(), 0)

    def line(self) -> str:
        s = self.stats.snapshot()
        now = time.monotonic()
        then, before = self._last
        rate = (s["messages"] - before) / max(now - then, 1e-6)
        self._last = (now, s["messages"])
        error = f" | last error: {s['last_error'][:60]}" if s["last_error"] else ""
        return (
            f"{s['messages']} messages ({rate:,.0f}/s), {s['open_streams']} streams open, "
            f"{s['retries']} retries, {s['redeliveries']} redeliveries{error}"
        )

    def run(self) -> None:
        while not self.done.wait(0.5 if self.tty else self.every):
            self.emit()

    def emit(self, final: bool = False) -> None:
        if self.tty:
            self.stream.write("\r\x1b[2K" + self.line() + ("\n" if final else ""))
            self.stream.flush()
        else:
            log.info(self.line())


def parser() -> argparse.ArgumentParser:
    args = argparse.ArgumentParser(
        prog="pixstream collect",
        description="Collect the Pix messages of ISPB from the service at URL.",
        epilog="Exit codes: 0 stopped by SIGTERM/Ctrl-C, 2 usage, 3 credential refused "
        "(401/403), 4 output failed, 5 other refusal.",
    )
    args.add_argument("url", help="the service's base URL, e.g. https://pix.example.com")
    args.add_argument("ispb", help="8 digits")
    args.add_argument("--streams", type=int, default=6, choices=range(1, 7), metavar="1-6")
    who = args.add_mutually_exclusive_group()
    who.add_argument("--token", help="bearer token (or set PIXSTREAM_TOKEN)")
    who.add_argument("--cert", help="client certificate (PEM) for mTLS")
    args.add_argument("--key", help="the certificate's private key (PEM)")
    args.add_argument("--cacert", help="CA bundle to verify the service with")
    out = args.add_mutually_exclusive_group(required=True)
    out.add_argument("--out", type=Path, help="append JSON lines to FILE (fsync per batch)")
    out.add_argument("--exec", dest="command", help="run CMD per batch, JSON lines on stdin")
    args.add_argument("--dedupe-file", type=Path, help="SQLite file for the endToEndId window")
    args.add_argument("--single", action="store_true", help="one message per read, not batches")
    args.add_argument("--status-every", type=float, default=10.0, help=argparse.SUPPRESS)
    return args


def run(argv: Sequence[str]) -> int:
    """Parse ``argv`` (after ``collect``), collect until a signal; the exit code."""
    opts = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    for noisy in ("httpx", "httpcore"):  # one INFO line per request would drown the status
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if opts.key and not opts.cert:
        parser().error("--key needs --cert")
    token = opts.token or os.environ.get("PIXSTREAM_TOKEN") or None
    cert: Any = (opts.cert, opts.key) if opts.cert and opts.key else opts.cert
    try:
        sink: JsonLinesSink | ExecSink = (
            JsonLinesSink(opts.out) if opts.out else ExecSink(opts.command)
        )
    except OSError as exc:
        log.error("cannot open %s: %s", opts.out, exc)
        return EXIT_OUTPUT
    dedup: Dedup | None = SqliteDedup(opts.dedupe_file) if opts.dedupe_file else None
    try:
        collection = Collection(
            opts.url, opts.ispb, sink, streams=opts.streams, token=token, cert=cert,
            verify=opts.cacert or True, batch=not opts.single, dedup=dedup,
        )  # fmt: skip
    except ValueError as exc:
        parser().error(str(exc))
    status = Status(collection.stats, sys.stderr, opts.status_every)
    stopping = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if not stopping.is_set():
            log.info("%s: finishing the batches in hand, closing the streams",
                     signal.Signals(signum).name)  # fmt: skip
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log.info("collecting %s from %s with %d streams", opts.ispb, opts.url, opts.streams)
    status.start()
    with collection:
        while not stopping.is_set() and not collection.wait(0.2):
            pass
    status.done.set()
    status.emit(final=True)
    sink.close()
    if isinstance(dedup, SqliteDedup):
        dedup.close()
    error = collection.error
    if isinstance(error, AuthError):
        log.error("the service refused the credential: %s", error)
        return EXIT_AUTH
    if isinstance(error, ClientError):
        log.error("the service refused: %s", error)
        return EXIT_REFUSED
    if error is not None:
        log.error("stopped: %r", error)
        return 1
    return EXIT_OK


def main() -> None:
    """``pixstream-collect`` (client-only install) and ``python -m pixstream.collect``."""
    sys.exit(run(sys.argv[1:]))


if __name__ == "__main__":
    main()
