"""The claim reads queued rows through the partial index, never by scanning the table.

Each scenario loads 200,000 messages for five ISPBs into a database of its own
(once per scenario, with INSERT ... SELECT generate_series), analyses it, and
explains the real claim (the ``confirm_claim_advance`` statement a read runs)
with its parameters substituted.

Scenarios, by the share of the table already collected (bound to a confirmed
pull) with the queued rows the newest:

- tail-queued: 99.9% collected, the steady state of a long-running service;
- half-collected: a backlog as large as the history, e.g. after a seed;
- all-queued: a fresh seed, nothing collected yet.

The last two guard a regression: with ``recipient_ispb = %(ispb)s ... ORDER BY
id`` the planner chose to walk pix_message_pkey with a filter there, reading the
collected history (or other ISPBs' backlog) before the first queued row: 18 ms
instead of 0.2 ms at 100,000 rows, growing with the table.

psycopg prepares a statement after five executions on a connection, and
PostgreSQL may then run it with a generic plan, made without the parameters'
values. So the hot statements (the claim, the stream lock, both expiries, ...)
are also checked the way a long-lived pooled connection runs them: prepared by
psycopg itself, with its parameter types, and explained with ``EXPLAIN
EXECUTE`` under ``plan_cache_mode = force_generic_plan``. The scenario adds the
streams those statements read: a history of closed streams and six open ones
per ISPB.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from pixstream import migrate
from pixstream.sql import QUERIES

ROWS = 200_000
CLOSED_STREAMS = 20_000
ISPBS = ("32074986", "60701190", "18236120", "00360305", "90400888")
PULL = "claimplan0000000000000000"
CLAIM = "confirm_claim_advance"


def claim_params(ispb: str, limit: int, stream_id: int = 1) -> dict[str, Any]:
    """The claim's parameters: a read of stream ``stream_id`` that used a pull of the history."""
    return {"ispb": ispb, "pull": PULL, "limit": limit, "stream_id": stream_id,
            "used": "histpull00000001", "answer_in": 8.0}  # fmt: skip


SCENARIOS = {"tail-queued": 0.999, "half-collected": 0.5, "all-queued": 0.0}


# Rows 1..ROWS, round-robin over ISPBS; row g is collected (bound to one of a
# series of confirmed pulls of ten messages) when g <= collected, else queued.
LOAD = """
INSERT INTO pix_stream (ispb, current_pull, closed_at, close_reason)
VALUES ('32074986', 'histpull00000000', now(), 'deleted');

INSERT INTO pix_pull (id, stream_id, confirmed_at)
SELECT 'histpull' || lpad(n::text, 8, '0'), (SELECT min(id) FROM pix_stream), now()
FROM generate_series(0, %(collected)s / 10) AS n;

INSERT INTO pix_message (end_to_end_id, valor, payer_name, payer_cpf_cnpj, payer_ispb,
    payer_agencia, payer_conta, payer_tipo_conta, recipient_name, recipient_cpf_cnpj,
    recipient_ispb, recipient_agencia, recipient_conta, recipient_tipo_conta, tx_id, paid_at,
    pull_id, delivery_count)
SELECT 'E60701190202401011200' || lpad(g::text, 11, '0'),
       (1 + g %% 500000) / 100.0, 'Ana Souza', '52998224725', '60701190', '0001', '12345',
       'CACC', 'Bruno Lima', '11144477735', (%(ispbs)s::text[])[1 + g %% %(n_ispbs)s],
       '0361', '67890', 'SVGS', 'tx' || g, now() - make_interval(secs => %(rows)s - g),
       CASE WHEN g <= %(collected)s THEN 'histpull' || lpad((g / 10)::text, 8, '0') END,
       CASE WHEN g <= %(collected)s THEN 1 ELSE 0 END
FROM generate_series(1, %(rows)s) AS g;

INSERT INTO pix_stream (ispb, current_pull, opened_at, last_seen_at, closed_at, close_reason)
SELECT (%(ispbs)s::text[])[1 + n %% %(n_ispbs)s], 'strmpull' || lpad(n::text, 8, '0'),
       now() - interval '2 days', now() - interval '1 day', now() - interval '1 day', 'expired'
FROM generate_series(1, %(closed_streams)s) AS n;

INSERT INTO pix_pull (id, stream_id, confirmed_at)
SELECT current_pull, id, now() FROM pix_stream WHERE current_pull LIKE 'strmpull%%';

INSERT INTO pix_stream (ispb, current_pull, last_seen_at)
SELECT ispb, 'histpull00000000', now() - make_interval(secs => n * 20)
FROM unnest(%(ispbs)s::text[]) AS ispb, generate_series(1, 6) AS n;
"""


def with_dbname(url: str, dbname: str) -> str:
    params = conninfo_to_dict(url)
    params["dbname"] = dbname
    return make_conninfo(**params)


def load(conn: psycopg.Connection, collected: int) -> None:
    params = {"collected": collected, "rows": ROWS, "ispbs": list(ISPBS), "n_ispbs": len(ISPBS),
              "closed_streams": CLOSED_STREAMS}  # fmt: skip
    with conn.transaction():
        for statement in LOAD.split(";\n"):
            if statement.strip():
                conn.execute(statement, params)
    conn.execute("ANALYZE pix_message")
    conn.execute("ANALYZE pix_pull")
    conn.execute("ANALYZE pix_stream")


@pytest.fixture(scope="module", params=list(SCENARIOS))
def scenario(request: pytest.FixtureRequest, server_url: str) -> Iterator[tuple[str, str]]:
    """(scenario name, URL of a database loaded for it), built once per scenario."""
    name = f"pixstream_plan_{secrets.token_hex(4)}"
    admin = with_dbname(server_url, "postgres")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = with_dbname(server_url, name)
    try:
        migrate.upgrade(url)
        with psycopg.connect(url, autocommit=True) as conn:
            load(conn, int(ROWS * SCENARIOS[request.param]))
        yield request.param, url
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def conn(scenario: tuple[str, str]) -> Iterator[psycopg.Connection]:
    with psycopg.connect(scenario[1], autocommit=True) as connection:
        yield connection


def nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", []):
        yield from nodes(child)


def explain(conn: psycopg.Connection, ispb: str, limit: int) -> tuple[list[dict[str, Any]], str]:
    """The scans of pix_message in the claim's plan, and the plan as text."""
    sql = psycopg.ClientCursor(conn).mogrify(QUERIES[CLAIM], claim_params(ispb, limit))
    assert "%(" not in sql, sql
    (document,) = conn.execute(f"EXPLAIN (FORMAT JSON)\n{sql}").fetchone()  # type: ignore[misc]
    if isinstance(document, str):
        document = json.loads(document)
    text = "\n".join(row[0] for row in conn.execute(f"EXPLAIN\n{sql}"))
    scans = [
        n
        for n in nodes(document[0]["Plan"])
        if n.get("Relation Name") == "pix_message" and "Scan" in n["Node Type"]
    ]
    assert scans, text
    return scans, text


CASES = [(ispb, limit) for ispb in (ISPBS[0], ISPBS[-1], "99999999") for limit in (1, 10)]


def test_data_is_loaded_as_the_scenario_says(
    scenario: tuple[str, str], conn: psycopg.Connection
) -> None:
    name, _ = scenario
    (total, queued, newest_collected, oldest_queued) = conn.execute(
        "SELECT count(*), count(*) FILTER (WHERE pull_id IS NULL),"
        " max(id) FILTER (WHERE pull_id IS NOT NULL), min(id) FILTER (WHERE pull_id IS NULL)"
        " FROM pix_message"
    ).fetchone()  # type: ignore[misc]
    assert total == ROWS
    assert queued == ROWS - int(ROWS * SCENARIOS[name])
    if newest_collected is not None:
        assert newest_collected < oldest_queued  # the queued rows are the newest


@pytest.mark.parametrize(("ispb", "limit"), CASES)
def test_claim_never_scans_the_table(conn: psycopg.Connection, ispb: str, limit: int) -> None:
    scans, text = explain(conn, ispb, limit)
    assert all(n["Node Type"] != "Seq Scan" for n in scans), text
    assert "Seq Scan" not in text


@pytest.mark.parametrize(("ispb", "limit"), CASES)
def test_claim_reads_the_queued_index(conn: psycopg.Connection, ispb: str, limit: int) -> None:
    scans, text = explain(conn, ispb, limit)
    # The other scan of pix_message is the UPDATE finding each claimed row by id.
    finders = [n for n in scans if "claimable" not in n.get("Index Cond", "")]
    assert len(finders) == 1, text
    assert finders[0]["Node Type"] == "Index Scan", text
    assert finders[0]["Index Name"] == "pix_message_queued_idx", text


def test_explained_statement_claims_the_oldest_queued(conn: psycopg.Connection) -> None:
    """The statement explained is the one that runs: it claims the ISPB's oldest queued rows."""
    with conn.transaction(force_rollback=True):
        (oldest,) = conn.execute(
            "SELECT coalesce(array_agg(end_to_end_id ORDER BY id), '{}') FROM (SELECT id,"
            " end_to_end_id FROM pix_message WHERE recipient_ispb = %s AND pull_id IS NULL"
            " ORDER BY id LIMIT 10) AS t",
            (ISPBS[0],),
        ).fetchone()  # type: ignore[misc]
        (stream_id,) = conn.execute("SELECT min(id) FROM pix_stream").fetchone()  # type: ignore[misc]
        rows = conn.execute(QUERIES[CLAIM], claim_params(ISPBS[0], 10, stream_id)).fetchall()
    assert len(oldest) == 10
    assert [json.loads(row[0])["endToEndId"] for row in rows] == oldest


# --------------------------------------------------------------------------- generic plans

PLACEHOLDER = re.compile(r"%\((\w+)\)s")


def generic_plan(
    conn: psycopg.Connection, name: str, params: dict[str, Any]
) -> tuple[list[dict[str, Any]], str]:
    """The plan nodes and text of statement ``name`` as a prepared statement runs it.

    psycopg prepares it (prepare=True, what it does by itself after five
    executions), with the parameter types it always sends; EXPLAIN EXECUTE
    under force_generic_plan then shows the plan made without the values.
    Inside a transaction rolled back: the statement runs once to be prepared.
    """
    known = "SELECT name FROM pg_prepared_statements WHERE NOT from_sql"
    with conn.transaction(force_rollback=True):
        conn.execute("SET LOCAL plan_cache_mode = force_generic_plan")
        before = {row[0] for row in conn.execute(known)}
        conn.execute(QUERIES[name], params, prepare=True)  # type: ignore[arg-type]
        (prepared,) = {row[0] for row in conn.execute(known)} - before
        # psycopg numbers the placeholders in the order of their first appearance.
        order = list(dict.fromkeys(PLACEHOLDER.findall(QUERIES[name])))
        execute = sql.SQL("EXECUTE {}({})").format(
            sql.Identifier(prepared), sql.SQL(", ").join(sql.Literal(params[k]) for k in order)
        )
        (document,) = conn.execute(sql.SQL("EXPLAIN (FORMAT JSON) {}").format(execute)).fetchone()  # type: ignore[misc]
        # VERBOSE: a parameter passed only to a function (unnest) shows there.
        text = "\n".join(
            row[0] for row in conn.execute(sql.SQL("EXPLAIN (VERBOSE) {}").format(execute))
        )
        (generic,) = conn.execute(
            "SELECT generic_plans FROM pg_prepared_statements WHERE name = %s", (prepared,)
        ).fetchone()  # type: ignore[misc]
    if isinstance(document, str):
        document = json.loads(document)
    # A generic plan compares with the parameters themselves ($n), not with their values.
    assert generic >= 1 and re.search(r"\$\d", text), text
    return list(nodes(document[0]["Plan"])), text


def scans_of(plan: list[dict[str, Any]], table: str) -> list[dict[str, Any]]:
    """The scans of ``table``; a bitmap scan as its Bitmap Index Scan, which names the index."""
    found = []
    for n in plan:
        if n.get("Relation Name") != table or "Scan" not in n["Node Type"]:
            continue
        if n["Node Type"] == "Bitmap Heap Scan":
            bitmaps = [b for b in nodes(n) if b["Node Type"] == "Bitmap Index Scan"]
            found.extend({**b, "Alias": n.get("Alias")} for b in bitmaps)
        else:
            found.append(n)
    return found


def index_names(plan: list[dict[str, Any]], table: str) -> set[str]:
    return {n.get("Index Name", n["Node Type"]) for n in scans_of(plan, table)}


IDLE = {"idle_seconds": 60.0}


@pytest.mark.parametrize("limit", [1, 10])
def test_prepared_claim_reads_the_queued_index(conn: psycopg.Connection, limit: int) -> None:
    plan, text = generic_plan(conn, CLAIM, claim_params(ISPBS[0], limit))
    finders = [
        n for n in scans_of(plan, "pix_message") if "claimable" not in n.get("Index Cond", "")
    ]
    assert len(finders) == 1, text
    assert finders[0]["Node Type"] == "Index Scan", text
    assert finders[0]["Index Name"] == "pix_message_queued_idx", text
    assert "Seq Scan" not in text


def test_prepared_stream_lock_finds_the_stream_by_keys(conn: psycopg.Connection) -> None:
    plan, text = generic_plan(conn, "lock_stream_by_pull", {"pull": "strmpull00000001", **IDLE})
    assert index_names(plan, "pix_pull") == {"pix_pull_pkey"}, text
    # The stream by its key; whether its ISPB has an idle stream by the open streams' index.
    assert index_names(plan, "pix_stream") == {"pix_stream_pkey", "pix_stream_open_idx"}, text
    assert "ispb = s.ispb" in text or "ispb = s_1.ispb" in text or "(ispb = s" in text, text
    assert "Seq Scan" not in text


def test_prepared_expiry_of_one_ispb_reads_only_its_open_streams(
    conn: psycopg.Connection,
) -> None:
    plan, text = generic_plan(conn, "expire_idle_streams_of_ispb", {"ispb": ISPBS[0], **IDLE})
    finders = [n for n in scans_of(plan, "pix_stream") if n.get("Alias") != "s"]
    assert len(finders) == 1, text
    assert finders[0]["Index Name"] == "pix_stream_open_idx", text
    # The ISPB bounds the index scan: not a walk of every open stream, filtered.
    assert "ispb = $" in finders[0]["Index Cond"], text
    assert "Seq Scan" not in text


def test_prepared_sweep_reads_only_open_streams(conn: psycopg.Connection) -> None:
    plan, text = generic_plan(conn, "expire_all_idle_streams", IDLE)
    finders = [n for n in scans_of(plan, "pix_stream") if n.get("Alias") != "s"]
    assert len(finders) == 1, text
    assert finders[0]["Index Name"] == "pix_stream_open_idx", text
    assert "Seq Scan" not in text


@pytest.mark.parametrize(
    ("name", "params", "table", "index"),
    [
        ("count_open_streams", {"ispb": ISPBS[0]}, "pix_stream", "pix_stream_open_idx"),
        (
            "find_keyed_stream",
            {"ispb": ISPBS[0], "key": "k"},
            "pix_stream",
            "pix_stream_idempotency_key_idx",
        ),
        ("confirm_pull", {"pull": "histpull00000001"}, "pix_pull", "pix_pull_pkey"),
        ("batch_documents", {"pull": "histpull00000001"}, "pix_message", "pix_message_pull_idx"),
        ("release_pull", {"pull": "histpull00000001"}, "pix_message", "pix_message_pull_idx"),
        (
            "touch_quiet_streams",
            {"ids": [1, 2], "pulls": ["strmpull00000001", "x"], "ahead": [1.0, 2.0]},
            "pix_stream",
            "pix_stream_pkey",
        ),
        (
            "streams_moved_on",
            {"ids": [1, 2], "pulls": ["strmpull00000001", "x"]},
            "pix_stream",
            "pix_stream_pkey",
        ),
    ],
)
def test_prepared_protocol_statements_use_their_index(
    conn: psycopg.Connection, name: str, params: dict[str, Any], table: str, index: str
) -> None:
    plan, text = generic_plan(conn, name, params)
    assert index in index_names(plan, table), text
    assert "Seq Scan" not in text


# A parameter that may be NULL to mean "any" makes a statement serve two cases
# with one generic plan. Allowed only where the column has no index to lose.
TWO_PURPOSE = re.compile(r"%\((\w+)\)s(?:::\w+)?\s+IS\s+NULL", re.IGNORECASE)
NOT_INDEXED = {("list_credentials", "kind"), ("list_credentials_of_ispb", "kind")}


def test_no_statement_serves_two_purposes_through_an_indexed_column() -> None:
    found = {(name, param) for name, text in QUERIES.items() for param in TWO_PURPOSE.findall(text)}
    assert found <= NOT_INDEXED, found - NOT_INDEXED
