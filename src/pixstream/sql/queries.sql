-- Every statement pixstream runs, by name. store.py is the only caller.
-- Parameters are psycopg named placeholders.

-- name: lock_ispb
-- Serialises count-and-create of streams per ISPB (held until commit), so that
-- concurrent starts can never open more than the limit.
SELECT pg_advisory_xact_lock(7243, %(ispb)s::integer);

-- name: count_open_streams
SELECT count(*) FROM pix_stream WHERE ispb = %(ispb)s AND closed_at IS NULL;

-- name: insert_stream
-- The first pull is both the current one and the one a repeated start reads.
-- opened_by: the process ("host:pid") that opened it, shown by the console.
INSERT INTO pix_stream (ispb, current_pull, start_pull, idempotency_key, opened_by)
VALUES (%(ispb)s, %(pull)s, %(pull)s, %(key)s, %(opened_by)s) RETURNING id;

-- name: find_keyed_stream
-- The id and first pull of the ISPB's open stream started with this Idempotency-Key,
-- through the partial unique index pix_stream_idempotency_key_idx. Run under
-- lock_ispb, which every start of the ISPB takes before it looks a key up or
-- inserts a stream, so the answer holds until the commit as far as starts
-- go. No row lock: start_pull never changes, and whether the stream is still
-- at that pull is decided by the read that follows, which locks the row
-- (lock_stream_by_pull) before it looks.
SELECT id, start_pull FROM pix_stream
WHERE ispb = %(ispb)s AND idempotency_key = %(key)s AND closed_at IS NULL;

-- name: insert_pull
INSERT INTO pix_pull (id, stream_id, size, confirmed_at)
VALUES (%(pull)s, %(stream_id)s, %(size)s, CASE WHEN %(confirmed)s THEN now() END);

-- name: lock_stream_by_pull
-- Row-locks the stream so that a request and its retry, or a request and the
-- sweeper, decide one after the other.
--
-- Shaped so that the lock never loses the row. Under READ COMMITTED, when
-- the stream row was changed by a transaction that commits while we wait for
-- its lock, PostgreSQL re-checks the WHERE clause against the stream's newest
-- version but keeps the rows of any other table of a join as first read.
-- Joining the row of the stream's current pull (p.id = s.current_pull) made
-- a retry overlapping the request it repeats, which had just moved the
-- stream on, find no row: an id the service issued answered 404. So the
-- statement reads one table: the stream, found through its pull's stream_id,
-- which never changes. The read's next statement (confirm_claim_advance)
-- confirms and claims, and sees every row committed before it began.
SELECT s.id, s.ispb, s.current_pull, s.replay_pull, s.close_reason, s.closed_by_pull,
       s.last_seen_at < now() - make_interval(secs => %(idle_seconds)s) AS idle,
       -- Whether a lazy expiry would find anything: a read runs that statement
       -- only then (now() is the transaction's, so both agree).
       EXISTS (SELECT FROM pix_stream o
               WHERE o.ispb = s.ispb AND o.closed_at IS NULL
                 AND o.last_seen_at < now() - make_interval(secs => %(idle_seconds)s))
           AS idle_in_ispb
FROM pix_stream s
WHERE s.id = (SELECT x.stream_id FROM pix_pull x WHERE x.id = %(pull)s)
FOR UPDATE;

-- name: confirm_pull
-- The batch delivered with this pull is collected; the count of its messages.
UPDATE pix_pull SET confirmed_at = now() WHERE id = %(pull)s AND confirmed_at IS NULL
RETURNING size;

-- name: confirm_claim_advance
-- The body of a read, in one round trip: confirm the batch of the pull just
-- used (if unconfirmed), claim the ISPB's oldest queued messages, skipping
-- rows another stream is claiming right now, bind them to the new pull, then
-- either make that pull current (a repeat of the used pull replays it) or,
-- when nothing was claimed, supersede the replay: older ids answer 410 from
-- now on, and idleness counts from the end of the answer, which a long poll
-- gives answer_in seconds on. The caller holds the stream's row lock
-- (lock_stream_by_pull). A data-modifying CTE sees none of the others'
-- changes, only what they return: the stream's update reads the claim's
-- count through "tally". The pull row is inserted in the same statement as
-- the messages that point to it, which the deferred foreign key allows. One
-- row comes back even when nothing was claimed (its document is NULL), to
-- carry the count of messages confirmed.
WITH confirmed AS (
    UPDATE pix_pull SET confirmed_at = now()
    WHERE id = %(used)s AND confirmed_at IS NULL
    RETURNING size
), claimable AS (
    SELECT id FROM pix_message
    -- The ISPB as a range, not an equality, with ORDER BY recipient_ispb, id:
    -- only the queued index (recipient_ispb, id) WHERE pull_id IS NULL yields
    -- that order. With "=", the planner reduces the order to id alone and,
    -- misjudging where the queued rows are, may walk the primary key through
    -- the whole collected history (measured: 18 ms instead of 0.2 ms at 100k).
    WHERE recipient_ispb >= %(ispb)s AND recipient_ispb <= %(ispb)s AND pull_id IS NULL
    ORDER BY recipient_ispb, id
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
), claimed AS (
    UPDATE pix_message m
    SET pull_id = %(pull)s, delivery_count = m.delivery_count + 1
    FROM claimable
    WHERE m.id = claimable.id
    RETURNING m.id, m.delivery_count > 1 AS redelivered, pix_message_document(m) AS document
), tally AS (
    SELECT count(*) AS size FROM claimed
), new_pull AS (
    INSERT INTO pix_pull (id, stream_id, size)
    SELECT %(pull)s, %(stream_id)s, t.size FROM tally t WHERE t.size > 0
), moved AS (
    UPDATE pix_stream s
    SET current_pull = CASE WHEN t.size > 0 THEN %(pull)s ELSE s.current_pull END,
        replay_pull = CASE WHEN t.size > 0 THEN %(used)s END,
        last_seen_at = CASE WHEN t.size > 0 THEN now()
                            ELSE now() + make_interval(secs => %(answer_in)s) END
    FROM tally t
    WHERE s.id = %(stream_id)s
)
SELECT c.document, c.redelivered, (SELECT size FROM confirmed) AS confirmed
FROM (SELECT) AS one LEFT JOIN claimed c ON true
ORDER BY c.id;

-- name: batch_documents
SELECT pix_message_document(m) FROM pix_message m WHERE m.pull_id = %(pull)s ORDER BY m.id;

-- name: touch_stream
UPDATE pix_stream SET last_seen_at = now() WHERE id = %(stream_id)s;

-- name: touch_quiet_streams
-- Last-seen times owed by long polls that waited without a transaction
-- (quiet.py): each counts from when its answer is due, ahead seconds from now
-- (relative, so that the app hosts' clocks do not matter). Only streams still
-- open at that pull, and only forward. SKIP LOCKED, ordered: a stream locked
-- right now is being served by a request that writes its own last-seen time,
-- or closed; and two writers never wait on each other.
WITH owed AS (
    SELECT * FROM unnest(%(ids)s::bigint[], %(pulls)s::text[], %(ahead)s::float8[])
        AS o(stream_id, pull, ahead)
), locked AS (
    SELECT s.id FROM pix_stream s
    WHERE s.id = ANY(%(ids)s::bigint[])
    ORDER BY s.id
    FOR UPDATE SKIP LOCKED
)
UPDATE pix_stream s
SET last_seen_at = greatest(s.last_seen_at, now() + make_interval(secs => o.ahead))
FROM owed o JOIN locked l ON l.id = o.stream_id
WHERE s.id = o.stream_id AND s.current_pull = o.pull AND s.closed_at IS NULL;

-- name: streams_moved_on
-- Run by the listener's connection after a reconnect: which of the streams
-- that polls wait on without having claimed (quiet.py) were closed, or moved
-- past the pull those polls use, while closes were not being heard.
SELECT o.stream_id
FROM unnest(%(ids)s::bigint[], %(pulls)s::text[]) AS o(stream_id, pull)
WHERE NOT EXISTS (
    SELECT FROM pix_stream s
    WHERE s.id = o.stream_id AND s.current_pull = o.pull AND s.closed_at IS NULL
);

-- name: close_stream
UPDATE pix_stream
SET closed_at = now(), close_reason = 'deleted', closed_by_pull = %(pull)s, last_seen_at = now()
WHERE id = %(stream_id)s;

-- name: release_pull
-- Puts an unconfirmed batch back in the queue; the count of messages given back.
WITH released AS (
    UPDATE pix_message m SET pull_id = NULL
    FROM pix_pull p
    WHERE m.pull_id = %(pull)s AND p.id = m.pull_id AND p.confirmed_at IS NULL
    RETURNING m.id
)
SELECT count(*) FROM released;

-- name: expire_idle_streams_of_ispb
-- Streams nobody asked for within the idle window stop counting against the
-- limit and give their unconfirmed batch back to the queue. Run lazily for one
-- ISPB, at start and at claim; expire_all_idle_streams is the periodic sweep.
-- Two statements, not one with "ispb = x OR x IS NULL": psycopg prepares a
-- statement after five executions, and the generic plan of such a shape cannot
-- use the ISPB as an index condition, so every lazy expiry would read all open
-- streams (tests/test_claim_plan.py checks the generic plans).
-- SKIP LOCKED leaves a stream that a request is serving right now to that
-- request, and keeps two expiries from waiting on each other.
WITH idle AS (
    SELECT id FROM pix_stream
    WHERE closed_at IS NULL
      AND ispb = %(ispb)s
      AND last_seen_at < now() - make_interval(secs => %(idle_seconds)s)
    FOR UPDATE SKIP LOCKED
), expired AS (
    -- Lock first, then read: a stream moved on by a transaction that committed
    -- after this statement began is re-checked in its newest version, but the
    -- release below reads pix_pull as of the statement's start, where that
    -- stream's new pull does not exist yet: its batch would stay bound to a
    -- closed stream. Such a stream (possible only when a request's transaction
    -- outlasts the idle window) is left to the next expiry.
    UPDATE pix_stream s SET closed_at = now(), close_reason = 'expired'
    FROM idle WHERE s.id = idle.id
      AND EXISTS (SELECT FROM pix_pull p WHERE p.id = s.current_pull)
    RETURNING s.id, s.ispb, s.current_pull
), released AS (
    UPDATE pix_message m SET pull_id = NULL
    FROM expired e JOIN pix_pull p ON p.id = e.current_pull AND p.confirmed_at IS NULL
    WHERE m.pull_id = e.current_pull
    RETURNING e.id AS stream_id
)
SELECT e.id, e.ispb, count(r.stream_id) AS released
FROM expired e LEFT JOIN released r ON r.stream_id = e.id
GROUP BY e.id, e.ispb;

-- name: expire_all_idle_streams
-- The periodic sweep: expire_idle_streams_of_ispb for every ISPB at once, so
-- that streams of ISPBs nobody reads any more expire too. Same SKIP LOCKED.
WITH idle AS (
    SELECT id FROM pix_stream
    WHERE closed_at IS NULL
      AND last_seen_at < now() - make_interval(secs => %(idle_seconds)s)
    FOR UPDATE SKIP LOCKED
), expired AS (
    -- Lock first, then read: as in expire_idle_streams_of_ispb.
    UPDATE pix_stream s SET closed_at = now(), close_reason = 'expired'
    FROM idle WHERE s.id = idle.id
      AND EXISTS (SELECT FROM pix_pull p WHERE p.id = s.current_pull)
    RETURNING s.id, s.ispb, s.current_pull
), released AS (
    UPDATE pix_message m SET pull_id = NULL
    FROM expired e JOIN pix_pull p ON p.id = e.current_pull AND p.confirmed_at IS NULL
    WHERE m.pull_id = e.current_pull
    RETURNING e.id AS stream_id
)
SELECT e.id, e.ispb, count(r.stream_id) AS released
FROM expired e LEFT JOIN released r ON r.stream_id = e.id
GROUP BY e.id, e.ispb;

-- name: notify_ispbs
-- Wake the readers of these ISPBs (delivered when the transaction commits).
SELECT count(pg_notify('pix_inserted', ispb)) FROM unnest(%(ispbs)s::text[]) AS ispb;

-- name: notify_streams_closed
-- A DELETE or an expiry: polls that would skip their claim on these streams
-- (they trust the listener, see quiet.py) must ask the database instead.
SELECT count(pg_notify('pix_stream_closed', id::text)) FROM unnest(%(ids)s::bigint[]) AS id;

-- name: count_all_open_streams
SELECT count(*) FROM pix_stream WHERE closed_at IS NULL;

-- name: copy_messages
COPY pix_message (end_to_end_id, valor, payer_name, payer_cpf_cnpj, payer_ispb, payer_agencia,
                  payer_conta, payer_tipo_conta, recipient_name, recipient_cpf_cnpj,
                  recipient_ispb, recipient_agencia, recipient_conta, recipient_tipo_conta,
                  campo_livre, tx_id, paid_at)
FROM STDIN;

-- name: ping
SELECT 1;

-- Credentials (access.py)
-- Tokens are found by the SHA-256 of the token, certificates by the SHA-256
-- fingerprint of their DER encoding (see migration 0004_credentials).

-- name: insert_credential
-- Announced on pix_credentials: a process that just refused this certificate
-- (its brief negative cache) accepts it as soon as the commit lands.
WITH new AS (
    INSERT INTO pix_credential (ispb, kind, admin, label, secret_hash, subject, expires_at)
    VALUES (%(ispb)s, %(kind)s, %(admin)s, %(label)s, %(secret_hash)s, %(subject)s,
            %(expires_at)s)
    RETURNING *
)
SELECT id, ispb, kind, admin, label, created_at, last_used_at, expires_at, revoked_at,
       secret_hash, subject
FROM new, pg_notify('pix_credentials', new.id::text) AS announced;

-- name: find_credential_by_hash
-- Revoked and expired rows too: the caller tells the client which it was.
SELECT id, ispb, kind, admin, label, secret_hash, expires_at, revoked_at
FROM pix_credential WHERE secret_hash = %(secret_hash)s;

-- name: get_credential
SELECT id, ispb, kind, admin, label, created_at, last_used_at, expires_at, revoked_at,
       secret_hash, subject
FROM pix_credential WHERE id = %(id)s;

-- name: list_credentials
-- Every credential, administrators included; of one kind or both (kind NULL:
-- a filter only, no index has the kind). One ISPB's: list_credentials_of_ispb,
-- a statement of its own so that its prepared (generic) plan keeps the ISPB
-- as an index condition.
SELECT id, ispb, kind, admin, label, created_at, last_used_at, expires_at, revoked_at,
       secret_hash, subject
FROM pix_credential
WHERE kind = %(kind)s OR %(kind)s::text IS NULL
ORDER BY id;

-- name: list_credentials_of_ispb
SELECT id, ispb, kind, admin, label, created_at, last_used_at, expires_at, revoked_at,
       secret_hash, subject
FROM pix_credential
WHERE ispb = %(ispb)s AND (kind = %(kind)s OR %(kind)s::text IS NULL)
ORDER BY id;

-- name: revoke_credential
-- Idempotent: a second revocation keeps the first time. Returns the id when
-- the credential exists, and announces it on pix_credentials, delivered to
-- every host's listener when the transaction commits: each drops it from its
-- cache (access.py).
WITH revoked AS (
    UPDATE pix_credential SET revoked_at = coalesce(revoked_at, now())
    WHERE id = %(id)s
    RETURNING id
)
SELECT revoked.id FROM revoked, pg_notify('pix_credentials', revoked.id::text) AS announced;

-- name: touch_credentials
-- Batched, from each process's cache, at most once a minute per credential;
-- never older than what another host already wrote.
UPDATE pix_credential
SET last_used_at = greatest(last_used_at, %(used_at)s)
WHERE id = ANY(%(ids)s::bigint[]);

-- Limits (streams.py)

-- name: set_session_limits
-- Run once on each new pooled connection (session-wide, so it costs no round
-- trip per request), with limits db.server_limits derives from the pool
-- timeout, so that the server gives up before the client does:
-- lock_timeout: a request waits at most this long for a row or advisory lock,
--   e.g. a stream locked by a request on another host, then fails with
--   lock_not_available (55P03), answered 503 with Retry-After;
-- statement_timeout: a statement still running when the client's deadline
--   would abandon it is cancelled by the server (57014), so it does not keep
--   running, and keep its locks, after the request answered 503;
-- idle_in_transaction_session_timeout: a backend whose client went quiet
--   mid-transaction (a frozen worker, a partition; a socket the server never
--   sees close) is terminated, and its row and advisory locks released.
SELECT set_config('lock_timeout', %(lock_timeout)s, false),
       set_config('statement_timeout', %(statement_timeout)s, false),
       set_config('idle_in_transaction_session_timeout', %(idle_timeout)s, false);

-- name: set_local_statement_timeout
-- For this transaction only: work that is not a protocol request (seeding's
-- COPY of a large batch) gets a limit of its own.
SELECT set_config('statement_timeout', %(timeout)s, true);

-- name: lock_retention
-- One retention purge at a time across every process and host (the others
-- skip their turn instead of deleting the same rows).
SELECT pg_try_advisory_xact_lock(7244, 0);

-- name: purge_confirmed_messages
-- Retention: up to limit messages whose batch was confirmed longer ago than
-- the retention, in id order from after_id, and with them the pulls they
-- leave empty, unless a stream still points at one (its current, replay,
-- start or closing id). Unconfirmed messages are never touched. Such a
-- message was inserted before the cutoff too: the walk of the primary key
-- stops at the first message inserted since (the frontier), and the caller
-- continues the next batch after the last id this one looked at, so rows
-- kept (unconfirmed, or confirmed later) are read once per pass, not per batch.
WITH frontier AS (
    SELECT coalesce(min(id), 9223372036854775807) AS id FROM pix_message
    WHERE inserted_at >= now() - make_interval(secs => %(retention_seconds)s)
), doomed AS (
    SELECT m.id, m.pull_id
    FROM pix_message m JOIN pix_pull p ON p.id = m.pull_id
    WHERE m.id > %(after_id)s AND m.id < (SELECT id FROM frontier)
      AND p.confirmed_at < now() - make_interval(secs => %(retention_seconds)s)
    ORDER BY m.id
    LIMIT %(limit)s
    FOR UPDATE OF m SKIP LOCKED
), messages AS (
    DELETE FROM pix_message m USING doomed d WHERE m.id = d.id RETURNING m.id
), pulls AS (
    DELETE FROM pix_pull p
    USING (SELECT DISTINCT pull_id FROM doomed) d
    WHERE p.id = d.pull_id
      AND NOT EXISTS (
          SELECT FROM pix_stream s
          WHERE s.id = p.stream_id
            AND p.id IN (s.current_pull, s.replay_pull, s.start_pull, s.closed_by_pull)
      )
      AND NOT EXISTS (
          SELECT FROM pix_message o
          WHERE o.pull_id = p.id AND o.id NOT IN (SELECT id FROM doomed)
      )
    RETURNING p.id
)
SELECT (SELECT count(*) FROM messages), (SELECT count(*) FROM pulls),
       (SELECT max(id) FROM messages);

-- name: purge_closed_streams
-- Retention: up to limit streams closed longer ago than the retention, with their pulls and
-- the confirmed messages still bound to those. A stream one of whose pulls
-- still holds an unconfirmed message (none should: closing gives the batch
-- back) is left alone, so that no unconfirmed message is ever removed.
WITH doomed AS (
    SELECT s.id FROM pix_stream s
    WHERE s.closed_at < now() - make_interval(secs => %(retention_seconds)s)
      AND NOT EXISTS (
          SELECT FROM pix_pull p JOIN pix_message m ON m.pull_id = p.id
          WHERE p.stream_id = s.id AND p.confirmed_at IS NULL
      )
    ORDER BY s.id
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
), messages AS (
    DELETE FROM pix_message m USING pix_pull p, doomed d
    WHERE p.stream_id = d.id AND m.pull_id = p.id
    RETURNING m.id
), pulls AS (
    DELETE FROM pix_pull p USING doomed d WHERE p.stream_id = d.id RETURNING p.id
), streams AS (
    DELETE FROM pix_stream s USING doomed d WHERE s.id = d.id RETURNING s.id
)
SELECT (SELECT count(*) FROM messages), (SELECT count(*) FROM pulls),
       (SELECT count(*) FROM streams);


-- Console and gauges (console.py, the sweeper in runtime.py)
-- Every statement below reads through an index (tests/test_console_plans.py
-- explains each one on a seeded table and fails on a sequential scan of
-- pix_message). Their cost follows what is queued, in flight or recent,
-- never the history.

-- name: heartbeat
-- Each process's sweeper, every sweep: this process is alive, with its
-- listener's state. Rows silent for a day (processes long gone) are removed.
WITH gone AS (
    DELETE FROM pix_process WHERE seen_at < now() - interval '1 day'
)
INSERT INTO pix_process (id, host, pid, started_at, seen_at, listener_connected,
                         listener_reconnects, waiting, rate_429, rate_503)
VALUES (%(id)s, %(host)s, %(pid)s, %(started_at)s, now(), %(listener_connected)s,
        %(listener_reconnects)s, %(waiting)s, %(rate_429)s, %(rate_503)s)
ON CONFLICT (id) DO UPDATE
SET seen_at = now(), listener_connected = excluded.listener_connected,
    listener_reconnects = excluded.listener_reconnects, waiting = excluded.waiting,
    rate_429 = excluded.rate_429, rate_503 = excluded.rate_503;

-- name: list_processes
-- Every process heard from in the last day, with how long ago (the database's
-- clock, not the hosts').
SELECT id, host, pid, started_at, extract(epoch FROM now() - seen_at)::float8 AS silent_for,
       listener_connected, listener_reconnects, waiting, rate_429, rate_503
FROM pix_process ORDER BY host, pid;

-- name: queued_by_ispb
-- Queued messages per ISPB and the oldest one's insertion time: an
-- index-only scan of pix_message_queued_idx (queued rows only), then one
-- primary-key probe per ISPB for the oldest row's inserted_at (a scalar
-- subquery, so never a join that could read the table).
SELECT q.recipient_ispb, q.queued,
       (SELECT m.inserted_at FROM pix_message m WHERE m.id = q.oldest_id) AS oldest
FROM (
    SELECT recipient_ispb, count(*) AS queued, min(id) AS oldest_id
    FROM pix_message WHERE pull_id IS NULL
    GROUP BY recipient_ispb
) q;

-- name: in_flight_by_ispb
-- Delivered but unconfirmed messages per ISPB: the batches held by open
-- streams (their current pull, unconfirmed). LATERAL with an aggregate:
-- per open stream, one probe of pix_pull's key and one of the pull index,
-- never a walk of either (they hold the whole collected history until the
-- retention removes it).
SELECT s.ispb, sum(b.n)::bigint AS in_flight, min(b.oldest) AS oldest
FROM pix_stream s
CROSS JOIN LATERAL (
    SELECT count(*) AS n, min(m.inserted_at) AS oldest
    FROM pix_pull p JOIN pix_message m ON m.pull_id = p.id
    WHERE p.id = s.current_pull AND p.confirmed_at IS NULL AND p.size > 0
) b
WHERE s.closed_at IS NULL AND b.n > 0
GROUP BY s.ispb;

-- name: open_streams_by_ispb
SELECT ispb, count(*) AS open, max(last_seen_at) AS last_seen
FROM pix_stream WHERE closed_at IS NULL
GROUP BY ispb;

-- name: recent_activity_by_ispb
-- The last %(seconds)s of deliveries per ISPB, from the pulls issued since:
-- messages delivered, messages given back (a batch never confirmed whose
-- stream closed or moved on: it went back to the queue to be redelivered),
-- and the latest delivery.
SELECT s.ispb,
       sum(p.size) AS delivered,
       coalesce(sum(p.size) FILTER (WHERE p.confirmed_at IS NULL
                                    AND (s.closed_at IS NOT NULL OR s.current_pull <> p.id)),
                0) AS given_back,
       max(p.issued_at) AS last_delivery
FROM pix_pull p JOIN pix_stream s ON s.id = p.stream_id
WHERE p.issued_at > now() - make_interval(secs => %(seconds)s) AND p.size > 0
GROUP BY s.ispb;

-- name: inserted_per_bucket
-- Messages inserted per %(bucket)s-second bucket over the last %(seconds)s,
-- through the BRIN index on inserted_at (the newest pages only).
SELECT floor(extract(epoch FROM now() - inserted_at) / %(bucket)s)::int AS ago, count(*)
FROM pix_message
WHERE inserted_at > now() - make_interval(secs => %(seconds)s)
GROUP BY 1;

-- name: pulls_per_bucket
-- Messages delivered and confirmed per bucket, from the pulls issued over the
-- window (and a minute before it, for the confirmations of those).
SELECT ago, sum(delivered)::bigint, sum(confirmed)::bigint FROM (
    SELECT floor(extract(epoch FROM now() - issued_at) / %(bucket)s)::int AS ago,
           size AS delivered, 0 AS confirmed
    FROM pix_pull
    WHERE issued_at > now() - make_interval(secs => %(seconds)s) AND size > 0
    UNION ALL
    SELECT floor(extract(epoch FROM now() - confirmed_at) / %(bucket)s)::int, 0, size
    FROM pix_pull
    WHERE issued_at > now() - make_interval(secs => %(seconds)s + 60)
      AND confirmed_at > now() - make_interval(secs => %(seconds)s) AND size > 0
) flows
GROUP BY ago;

-- name: open_streams_of_ispb
-- One institution's open streams, with the batch each holds (its current
-- pull's size while unconfirmed).
SELECT s.id, s.current_pull, s.opened_at, s.last_seen_at, s.opened_by,
       coalesce((SELECT p.size FROM pix_pull p
                 WHERE p.id = s.current_pull AND p.confirmed_at IS NULL), 0) AS held
FROM pix_stream s
WHERE s.ispb = %(ispb)s AND s.closed_at IS NULL
ORDER BY s.opened_at, s.id;

-- name: closed_streams_of_ispb
-- One institution's latest closed streams, newest first, with the batch each
-- gave back (its current pull, never confirmed).
SELECT s.id, s.current_pull, s.opened_at, s.closed_at, s.close_reason, s.opened_by,
       coalesce((SELECT p.size FROM pix_pull p
                 WHERE p.id = s.current_pull AND p.confirmed_at IS NULL), 0) AS given_back
FROM pix_stream s
WHERE s.ispb = %(ispb)s AND s.closed_at IS NOT NULL
ORDER BY s.closed_at DESC
LIMIT %(limit)s;

-- name: lock_open_stream
-- Lock first, then read: expire_stream runs after this, as a statement of its
-- own, so that its release reads the pull that is current once the lock is
-- held. Waiting for the lock inside it, a read that moved the stream on
-- meanwhile would leave the new batch bound to the closed stream. Waits for
-- the row lock (bounded by lock_timeout): the stream may be serving a read.
SELECT id FROM pix_stream
WHERE id = %(stream_id)s AND ispb = %(ispb)s AND closed_at IS NULL
FOR UPDATE;

-- name: expire_stream
-- An administrator closes one stream (the console): the same as an expiry
-- (expire_idle_streams_of_ispb) for one stream, whatever its last request.
-- Its unconfirmed batch goes back to the queue; its client's next request
-- answers 410. Run holding the lock taken by lock_open_stream.
WITH target AS (
    SELECT id FROM pix_stream
    WHERE id = %(stream_id)s AND ispb = %(ispb)s AND closed_at IS NULL
    FOR UPDATE
), expired AS (
    UPDATE pix_stream s SET closed_at = now(), close_reason = 'expired'
    FROM target WHERE s.id = target.id
    RETURNING s.id, s.ispb, s.current_pull
), released AS (
    UPDATE pix_message m SET pull_id = NULL
    FROM expired e JOIN pix_pull p ON p.id = e.current_pull AND p.confirmed_at IS NULL
    WHERE m.pull_id = e.current_pull
    RETURNING e.id AS stream_id
)
SELECT e.id, e.ispb, count(r.stream_id) AS released
FROM expired e LEFT JOIN released r ON r.stream_id = e.id
GROUP BY e.id, e.ispb;
