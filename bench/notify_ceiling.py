"""NOTIFY at volume: what the insert trigger's pg_notify costs inserting producers.

PostgreSQL serialises the commits of transactions that sent a notification
(one database-wide lock, taken at commit). This measures commits per second
of inserting transactions with pgbench (the field's standard load tool for
PostgreSQL), from 1, 4, 16 and 64 concurrent sessions, each transaction one
INSERT of 1 or of 100 messages spread over 200 ISPBs; once with the
``pix_message_inserted`` trigger and once with it disabled, a LISTEN
session open and draining meanwhile, as the service's listener would be.
The table is truncated before each cell, so that every cell starts alike.

    python bench/notify_ceiling.py [--seconds 5] [--sessions 1,4,16,64] [--sizes 1,100]
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import psycopg

import _common as c
from pixstream import migrate

TRIGGER = "pix_message_inserted"
# One INSERT of :size messages to ISPBs 10000000-10000199; ids unique by a sequence.
SCRIPT = """\\set ispb random(10000000, 10000199)
INSERT INTO pix_message (end_to_end_id, valor, payer_name, payer_cpf_cnpj, payer_ispb,
    payer_agencia, payer_conta, payer_tipo_conta, recipient_name, recipient_cpf_cnpj,
    recipient_ispb, recipient_agencia, recipient_conta, recipient_tipo_conta, tx_id, paid_at)
SELECT 'E12345678' || lpad(nextval('bench_e2e')::text, 12, '0') || 'abcdefghijk', 10.50,
    'Payer', '12345678901', '87654321', '0001', '12345', 'CACC', 'Recipient', '10987654321',
    ':ispb', '0002', '54321', 'CACC', 'tx', now()
FROM generate_series(1, {size});
"""


def drain_notifications(url: str, stop: threading.Event) -> None:
    """A LISTEN session that consumes every notification, like the service's listener."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("LISTEN pix_inserted")
        while not stop.is_set():
            for _ in conn.notifies(timeout=0.5):
                pass


def pgbench(url: str, script: Path, sessions: int, seconds: float) -> float:
    """Transactions per second that pgbench reports (initial connections excluded)."""
    out = subprocess.run(
        [shutil.which("pgbench") or "pgbench", "-n", "-f", str(script), "-c", str(sessions),
         "-j", str(min(sessions, 4)), "-T", str(int(seconds)), url],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    found = re.search(r"tps = ([0-9.]+) \(without initial connection time\)", out)
    if found is None:
        raise RuntimeError(f"no tps in pgbench's output:\n{out}")
    return float(found[1])


def main() -> None:
    args = c.parser(__doc__.split("\n", 1)[0])
    args.add_argument("--seconds", type=float, default=5)
    args.add_argument("--sessions", default="1,4,16,64")
    args.add_argument("--sizes", default="1,100")
    opts = args.parse_args()
    sessions = [int(n) for n in opts.sessions.split(",")]
    sizes = [int(n) for n in opts.sizes.split(",")]
    if shutil.which("pgbench") is None:
        raise SystemExit("pgbench is not installed (it comes with PostgreSQL's client tools)")
    rows = []
    with c.database() as db, tempfile.TemporaryDirectory() as scratch:
        migrate.upgrade(db.url)
        with psycopg.connect(db.url, autocommit=True) as conn:
            conn.execute("CREATE SEQUENCE bench_e2e")
            version = conn.execute("SHOW server_version").fetchone()[0]
        stop = threading.Event()
        listener = threading.Thread(target=drain_notifications, args=(db.url, stop), daemon=True)
        listener.start()
        try:
            for size in sizes:
                script = Path(scratch) / f"insert_{size}.sql"
                script.write_text(SCRIPT.format(size=size))
                for n in sessions:
                    row = {"messages_per_transaction": size, "sessions": n}
                    for trigger in ("on", "off"):
                        with psycopg.connect(db.url, autocommit=True) as conn:
                            conn.execute("TRUNCATE pix_message")
                            state = "ENABLE" if trigger == "on" else "DISABLE"
                            conn.execute(f"ALTER TABLE pix_message {state} TRIGGER {TRIGGER}")
                            conn.execute("CHECKPOINT")
                        row[f"tps_trigger_{trigger}"] = pgbench(db.url, script, n, opts.seconds)
                    row["trigger_cost"] = round(row["tps_trigger_off"] / row["tps_trigger_on"], 2)
                    c.log(f"notify: {row}")
                    rows.append(row)
        finally:
            stop.set()
            listener.join(2)
    single = {r["sessions"]: r for r in rows if r["messages_per_transaction"] == 1}
    best = max((r["tps_trigger_on"] for r in single.values()), default=None)
    c.emit(
        {
            "bench": "notify_ceiling",
            "database": db.kind,
            "server_version": version,
            "seconds_per_cell": opts.seconds,
            "rows": rows,
            "single_message_ceiling_tps": best,
            "messages_per_second_ceiling": {
                str(r["messages_per_transaction"]): max(
                    x["tps_trigger_on"] * x["messages_per_transaction"]
                    for x in rows
                    if x["messages_per_transaction"] == r["messages_per_transaction"]
                )
                for r in rows
            },
        }
    )


if __name__ == "__main__":
    main()
