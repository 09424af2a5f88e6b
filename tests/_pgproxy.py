"""A TCP proxy in front of PostgreSQL that can hold back the server's answer to COMMIT.

The fault it injects: a COMMIT that lands on the server while its client
does not hear of it in time (an overloaded client process, a slow network).
After ``delay_commit_after(marker, s)``, on the first connection whose client
sends ``marker`` (e.g. a statement's text), the server's next answer holding
CommandComplete for COMMIT (``C``, a length, ``COMMIT\\0``) is forwarded
``s`` seconds late. Other connections' commits pass untouched.
"""

from __future__ import annotations

import socket
import threading
import time
from contextlib import suppress

from psycopg.conninfo import conninfo_to_dict, make_conninfo


class CommitDelayProxy:
    def __init__(self, database_url: str) -> None:
        params = conninfo_to_dict(database_url)
        host, port = str(params.get("host") or "127.0.0.1"), int(params.get("port") or 5432)
        # A directory is a Unix socket (the embedded server listens on one).
        self._target = (
            (socket.AF_UNIX, f"{host}/.s.PGSQL.{port}")
            if host.startswith("/")
            else (socket.AF_INET, (host, port))
        )
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = make_conninfo(
            database_url, host="127.0.0.1", port=self._listener.getsockname()[1]
        )
        self._delay = 0.0
        self._marker = b""
        self._armed: socket.socket | None = None  # the server side of the marked connection
        self._lock = threading.Lock()
        self.delayed = 0  # COMMIT answers held back so far
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            family, address = self._target
            server = socket.socket(family, socket.SOCK_STREAM)
            server.connect(address)
            self._sockets += [client, server]
            threading.Thread(target=self._pump, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, True), daemon=True).start()

    def delay_commit_after(self, marker: bytes, seconds: float) -> None:
        with self._lock:
            self._marker, self._delay, self._armed = marker, seconds, None

    def _pump(self, source: socket.socket, sink: socket.socket, answers: bool) -> None:
        with suppress(OSError):
            while data := source.recv(65536):
                if not answers:
                    with self._lock:
                        if self._marker and self._armed is None and self._marker in data:
                            self._armed = sink  # this client's server socket
                elif self._armed is source and b"C\x00\x00\x00\x0bCOMMIT\x00" in data:
                    with self._lock:
                        delay, self._delay, self._armed, self._marker = self._delay, 0.0, None, b""
                    self.delayed += 1
                    time.sleep(delay)  # the fault itself, not a synchronisation
                sink.sendall(data)
        for sock in (source, sink):
            with suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._listener.close()
        for sock in self._sockets:
            with suppress(OSError):
                sock.close()
