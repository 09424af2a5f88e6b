-- Idempotent stream/start (docs/protocol.md, "Idempotency-Key").
--
-- A start is the one request whose answer, when lost, could not be repeated:
-- its repeat opened a second stream, leaving the first an orphan holding a
-- slot and its first batch until it expired. A start that carries an
-- Idempotency-Key stores it on the stream it opens; a repeat with the same key
-- finds that stream and is served as a read of its first pull id, which
-- replays the first answer (or, when nothing was delivered yet, waits for it).
--
-- The key, as the client sent it (validation.parse_idempotency_key: 1 to 255
-- visible ASCII characters); NULL for a start without the header.
ALTER TABLE pix_stream
    ADD COLUMN idempotency_key text
        CHECK (length(idempotency_key) BETWEEN 1 AND 255),
    -- The pull the stream was opened with: the id a repeated start reads. It is
    -- the stream's current_pull only until the first claim delivers, and pix_pull
    -- cannot tell it apart (its pulls of one transaction share issued_at), so it
    -- is kept. NULL only for streams opened before this migration.
    ADD COLUMN start_pull text,
    ADD CONSTRAINT pix_stream_keyed_start_pull
        CHECK (idempotency_key IS NULL OR start_pull IS NOT NULL);

-- One open stream per key and ISPB: a key finds at most one stream, and a key
-- becomes reusable once its stream is closed or expired (the index holds open
-- streams only, like pix_stream_open_idx). Starts of an ISPB already look the
-- key up and insert under its advisory lock (queries.sql, lock_ispb); the
-- index makes a second open stream with the key impossible even so, and is
-- how the lookup finds the stream.
CREATE UNIQUE INDEX pix_stream_idempotency_key_idx ON pix_stream (ispb, idempotency_key)
    WHERE idempotency_key IS NOT NULL AND closed_at IS NULL;
