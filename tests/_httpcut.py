"""A TCP proxy in front of gunicorn that can cut answers in the middle.

The fault it injects: an answer lost on the way back (a dropped connection,
a load balancer restart). After ``cut(n)``, the next ``n`` answers that carry
a body of messages (``HTTP/1.1 200``) are forwarded only halfway, then both
sides of that connection are closed. Everything else passes untouched.
"""

from __future__ import annotations

import socket
import threading
from contextlib import suppress


class CuttingProxy:
    def __init__(self, port: int) -> None:
        self._target = ("127.0.0.1", port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.base = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._lock = threading.Lock()
        self._to_cut = 0
        self.cuts = 0
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def cut(self, answers: int) -> None:
        with self._lock:
            self._to_cut = answers

    def _take(self) -> bool:
        with self._lock:
            if self._to_cut <= 0:
                return False
            self._to_cut -= 1
            self.cuts += 1
            return True

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self._target)
            except OSError:
                client.close()
                continue
            self._sockets += [client, server]
            threading.Thread(target=self._pump, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, True), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, answers: bool) -> None:
        with suppress(OSError):
            while data := source.recv(65536):
                if answers and data.startswith(b"HTTP/1.1 200") and self._take():
                    sink.sendall(data[: len(data) // 2])
                    break
                sink.sendall(data)
        for sock in (source, sink):
            with suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with suppress(OSError):
                sock.close()

    def close(self) -> None:
        self._listener.close()
        for sock in self._sockets:
            with suppress(OSError):
                sock.close()
