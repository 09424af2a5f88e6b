-- The operators' console (/console) and the sweeper's gauges (issue 15).
--
-- pix_process: one row per server process, upserted by its sweeper thread
-- every PIXSTREAM_SWEEP_SECONDS (with jitter). A host is alive while one of
-- its rows was written within three sweep periods; a row not written for a
-- day is deleted by the next heartbeat of any process. id is "host:pid".
CREATE TABLE pix_process (
    id                   text PRIMARY KEY,
    host                 text NOT NULL,
    pid                  integer NOT NULL,
    started_at           timestamptz NOT NULL,
    seen_at              timestamptz NOT NULL DEFAULT now(),
    listener_connected   boolean NOT NULL,
    listener_reconnects  integer NOT NULL DEFAULT 0,
    waiting              integer NOT NULL DEFAULT 0,
    -- Refusals this process answered per second since its previous heartbeat.
    rate_429             real NOT NULL DEFAULT 0,
    rate_503             real NOT NULL DEFAULT 0
);

-- The process ("host:pid") a stream was opened on, for the console. NULL for
-- streams opened before this migration. Never indexed: it does not keep the
-- hot updates of pix_stream from being HOT.
ALTER TABLE pix_stream ADD COLUMN opened_by text;

-- Deliveries and confirmations per second, and each ISPB's last hour, are
-- read from the pulls issued lately. One entry per delivered batch (not per
-- message); a confirmation (confirmed_at) stays a HOT update.
CREATE INDEX pix_pull_issued_idx ON pix_pull (issued_at);

-- An institution's recent expiries and closes, newest first.
CREATE INDEX pix_stream_closed_idx ON pix_stream (ispb, closed_at) WHERE closed_at IS NOT NULL;

-- Inserts per second over the last minutes. The table is append-only and
-- inserted_at follows the physical order, so a BRIN index (a few pages for
-- millions of rows, next to nothing to maintain) bounds the read to the
-- newest pages.
CREATE INDEX pix_message_inserted_brin ON pix_message USING brin (inserted_at)
    WITH (pages_per_range = 16);
