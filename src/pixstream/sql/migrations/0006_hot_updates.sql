-- Updates the hot path makes on every read, made so that PostgreSQL can do
-- them in place (HOT: no new index entries; the old version is pruned from
-- its page without a vacuum) wherever the columns allow.
--
-- pix_stream: every read writes last_seen_at (and current_pull, replay_pull).
-- last_seen_at was the second column of pix_stream_open_idx, so each of those
-- updates added an entry to every index of the table. The index keeps the
-- ISPB alone: it still bounds a lazy expiry to one ISPB's open streams (at
-- most six, then filtered on last_seen_at) and the sweep to the open ones.
-- fillfactor 70 leaves room on each page for the new versions.
DROP INDEX pix_stream_open_idx;
CREATE INDEX pix_stream_open_idx ON pix_stream (ispb) WHERE closed_at IS NULL;
ALTER TABLE pix_stream SET (fillfactor = 70);

-- pix_pull: a confirmation sets confirmed_at, which no index holds.
ALTER TABLE pix_pull SET (fillfactor = 85);

-- pix_message: a claim changes pull_id, which the queued and pull indexes
-- hold, so it can never be HOT; the table keeps fillfactor 100 (COPY fills
-- pages, and a message is claimed once or a few times in its life).
--
-- Autovacuum. The defaults wait for 20 % of a table to be dead: on a
-- pix_message of 100 million rows that is 20 million dead versions, many of
-- them at the head of each ISPB's range of the queued index, which every
-- claim walks past. Vacuum after 2 % (and after 5 % of new rows, so that the
-- visibility map keeps up with an insert-only stretch); analyze after 2 %,
-- so that the planner knows the queue's shape. pix_stream is small and
-- updated on every request: vacuum it after a fixed 1,000 dead versions,
-- whatever its size. pix_pull gets one row per delivered batch and one
-- update per confirmation: as pix_message.
ALTER TABLE pix_message SET (
    autovacuum_vacuum_scale_factor = 0.02,
    autovacuum_vacuum_insert_scale_factor = 0.05,
    autovacuum_analyze_scale_factor = 0.02
);
ALTER TABLE pix_stream SET (
    autovacuum_vacuum_scale_factor = 0,
    autovacuum_vacuum_threshold = 1000,
    autovacuum_analyze_scale_factor = 0.05
);
ALTER TABLE pix_pull SET (
    autovacuum_vacuum_scale_factor = 0.02,
    autovacuum_analyze_scale_factor = 0.02
);
