"""The insert trigger: one ``pix_inserted`` notification per recipient ISPB per
statement, COPY included, seen by a separate LISTEN connection.

Notifications arrive in commit order, so after the statement under test the
inserting connection sends a sentinel notification: once the listener has the
sentinel it has everything the statement sent, and counting is exact without
waiting for silence.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator

import psycopg
import pytest

from pixstream import store
from pixstream.generator import MessageFactory

CHANNEL = "pix_inserted"
SENTINEL = "sentinel"


@pytest.fixture
def listener(database_url: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(f"LISTEN {CHANNEL}")
        yield conn


def received(listener: psycopg.Connection, db: psycopg.Connection, timeout: float = 10) -> Counter:
    """Every payload notified on the channel before a sentinel sent now, counted."""
    db.execute("SELECT pg_notify(%s, %s)", (CHANNEL, SENTINEL))
    payloads: Counter[str] = Counter()
    deadline = time.monotonic() + timeout
    while (remaining := deadline - time.monotonic()) > 0:
        for notify in listener.notifies(timeout=remaining):
            if notify.payload == SENTINEL:
                return payloads
            payloads[notify.payload] += 1
    raise AssertionError(f"sentinel not received within {timeout} s; got {dict(payloads)}")


def insert_sql(ispbs_and_counts: list[tuple[str, int]]) -> tuple[str, dict[str, object]]:
    """One INSERT ... SELECT statement adding ``count`` rows for each ISPB."""
    selects = []
    params: dict[str, object] = {}
    for i, (ispb, count) in enumerate(ispbs_and_counts):
        params[f"ispb{i}"] = ispb
        params[f"n{i}"] = count
        selects.append(
            f"SELECT %(ispb{i})s::text AS ispb, g FROM generate_series(1, %(n{i})s) AS g"
        )
    sql = f"""
        INSERT INTO pix_message (end_to_end_id, valor, payer_name, payer_cpf_cnpj, payer_ispb,
            payer_agencia, payer_conta, payer_tipo_conta, recipient_name, recipient_cpf_cnpj,
            recipient_ispb, recipient_agencia, recipient_conta, recipient_tipo_conta, tx_id,
            paid_at)
        SELECT 'E00000000202401011200' || lpad((nextval('trigger_e2e'))::text, 11, '0'),
               10.00, 'Ana Souza', '52998224725', '00000000', '0001', '12345', 'CACC',
               'Bruno Lima', '11144477735', src.ispb, '0361', '67890', 'SVGS',
               'tx' || src.g, now()
        FROM ({" UNION ALL ".join(selects)}) AS src
    """
    return sql, params


@pytest.fixture
def e2e_sequence(db: psycopg.Connection) -> Iterator[None]:
    db.execute("CREATE TEMP SEQUENCE IF NOT EXISTS trigger_e2e")
    yield


def test_listener_sees_nothing_without_inserts(
    listener: psycopg.Connection, db: psycopg.Connection
) -> None:
    assert received(listener, db) == Counter()


def test_multi_row_insert_notifies_each_ispb_once(
    listener: psycopg.Connection, db: psycopg.Connection, e2e_sequence: None
) -> None:
    sql, params = insert_sql([("32074986", 5), ("60701190", 3), ("00000000", 1), ("32074986", 2)])
    db.execute(sql, params)
    assert received(listener, db) == Counter({"32074986": 1, "60701190": 1, "00000000": 1})
    (rows,) = db.execute("SELECT count(*) FROM pix_message").fetchone()  # type: ignore[misc]
    assert rows == 11


def test_each_statement_notifies_again(
    listener: psycopg.Connection, db: psycopg.Connection, e2e_sequence: None
) -> None:
    for _ in range(3):
        db.execute(*insert_sql([("32074986", 2)]))
    db.execute(*insert_sql([("60701190", 2)]))
    assert received(listener, db) == Counter({"32074986": 3, "60701190": 1})


def test_thousand_rows_one_ispb_one_notification(
    listener: psycopg.Connection, db: psycopg.Connection, e2e_sequence: None
) -> None:
    db.execute(*insert_sql([("32074986", 1000)]))
    assert received(listener, db) == Counter({"32074986": 1})
    (rows,) = db.execute(
        "SELECT count(*) FROM pix_message WHERE recipient_ispb = '32074986'"
    ).fetchone()  # type: ignore[misc]
    assert rows == 1000


def test_copy_notifies_each_ispb_once(listener: psycopg.Connection, db: psycopg.Connection) -> None:
    factory = MessageFactory(seed=7)
    rows = [
        *factory.rows("32074986", 400),
        *factory.rows("60701190", 300),
        *factory.rows("18236120", 300),
    ]
    with db.transaction():
        assert store.copy_messages(db, rows) == 1000
    assert received(listener, db) == Counter({"32074986": 1, "60701190": 1, "18236120": 1})


def test_copy_of_thousand_rows_one_ispb_one_notification(
    listener: psycopg.Connection, db: psycopg.Connection
) -> None:
    with db.transaction():
        store.copy_messages(db, MessageFactory(seed=8).rows("32074986", 1000))
    assert received(listener, db) == Counter({"32074986": 1})


def test_rolled_back_insert_notifies_nobody(
    listener: psycopg.Connection, db: psycopg.Connection, e2e_sequence: None
) -> None:
    with pytest.raises(RuntimeError), db.transaction():
        db.execute(*insert_sql([("32074986", 10)]))
        raise RuntimeError("roll back")
    assert received(listener, db) == Counter()
    (rows,) = db.execute("SELECT count(*) FROM pix_message").fetchone()  # type: ignore[misc]
    assert rows == 0
