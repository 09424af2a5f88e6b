"""A small blocking HTTP client on http.client: one keep-alive connection per
client object, so each concurrent collector in a test uses its own."""

from __future__ import annotations

import http.client
import json
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes
    elapsed: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())

    @property
    def pull_next(self) -> str | None:
        return self.header("Pull-Next")

    def json(self) -> Any:
        return json.loads(self.body)


class HttpClient:
    def __init__(self, base: str, timeout: float = 30) -> None:
        parts = urlsplit(base)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.timeout = timeout
        self._conn: http.client.HTTPConnection | None = None

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            self._conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        return self._conn

    def request(
        self,
        method: str,
        path: str,
        headers: dict[str, str] | None = None,
        *,
        fresh: bool = False,
        body: bytes | None = None,
    ) -> Reply:
        import time

        if fresh:
            self.close()
        started = time.perf_counter()
        conn = self._connection()
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            data = response.read()
        except (http.client.HTTPException, OSError):
            self.close()
            raise
        reply = Reply(
            response.status,
            {k.lower(): v for k, v in response.getheaders()},
            data,
            time.perf_counter() - started,
        )
        if response.will_close or fresh:
            self.close()
        return reply

    def get(self, path: str, accept: str | None = None) -> Reply:
        return self.request("GET", path, {"Accept": accept} if accept else None)

    def delete(self, path: str) -> Reply:
        return self.request("DELETE", path)

    def post(self, path: str) -> Reply:
        return self.request("POST", path)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
