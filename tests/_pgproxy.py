"""A TCP proxy in front of PostgreSQL that can hold back the server's answer to COMMIT.

The fault it injects: a COMMIT that lands on the server while its client
does not hear of it in time (an overloaded client process, a slow network).
The server's CommandComplete for COMMIT is the bytes ``C``, a length and
``COMMIT\\0``; after ``delay_next_commit(s)``, the next chunk holding them
(on any connection) is forwarded ``s`` seconds late.
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

    def delay_next_commit(self, seconds: float) -> None:
        self._delay = seconds

    def _pump(self, source: socket.socket, sink: socket.socket, answers: bool) -> None:
        with suppress(OSError):
            while data := source.recv(65536):
                if answers and self._delay and b"C\x00\x00\x00\x0bCOMMIT\x00" in data:
                    with self._lock:
                        delay, self._delay = self._delay, 0.0
                    if delay:
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
