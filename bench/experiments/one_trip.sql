-- Bench experiment, not production code: each read is one statement, one round trip.
-- bench/experiments/apply.py installs it in a scratch copy as a migration; the
-- functions mirror streams.py (open, continue, claim, expire) as of commit 54b9021.

CREATE FUNCTION pix_expire(p_ispb text, p_idle float8, OUT streams int, OUT released int)
LANGUAGE plpgsql AS $$
DECLARE
    notified int;
BEGIN
    WITH idle AS (
        SELECT id FROM pix_stream
        WHERE closed_at IS NULL
          AND (ispb = p_ispb OR p_ispb IS NULL)
          AND last_seen_at < now() - make_interval(secs => p_idle)
        FOR UPDATE SKIP LOCKED
    ), expired AS (
        UPDATE pix_stream s SET closed_at = now(), close_reason = 'expired'
        FROM idle WHERE s.id = idle.id
        RETURNING s.id, s.ispb, s.current_pull
    ), rel AS (
        UPDATE pix_message m SET pull_id = NULL
        FROM expired e JOIN pix_pull p ON p.id = e.current_pull AND p.confirmed_at IS NULL
        WHERE m.pull_id = e.current_pull
        RETURNING e.id AS sid, e.ispb AS rispb
    )
    SELECT (SELECT count(*) FROM expired), (SELECT count(*) FROM rel),
           (SELECT count(pg_notify('pix_inserted', q.i))
            FROM (SELECT DISTINCT rispb AS i FROM rel) q)
    INTO streams, released, notified;
END
$$;

CREATE FUNCTION pix_claim_into(
    p_ispb text, p_stream bigint, p_used text, p_next text, p_limit int,
    p_lazy_touch float8,
    OUT o_pull_next text, OUT o_documents text[], OUT o_redelivered int)
LANGUAGE plpgsql AS $$
BEGIN
    WITH claimable AS (
        SELECT id FROM pix_message
        WHERE recipient_ispb >= p_ispb AND recipient_ispb <= p_ispb AND pull_id IS NULL
        ORDER BY recipient_ispb, id
        LIMIT p_limit
        FOR UPDATE SKIP LOCKED
    ), claimed AS (
        UPDATE pix_message m
        SET pull_id = p_next, delivery_count = m.delivery_count + 1
        FROM claimable
        WHERE m.id = claimable.id
        RETURNING m.id, m.delivery_count, pix_message_document(m) AS document
    )
    SELECT array_agg(c.document ORDER BY c.id), count(*) FILTER (WHERE c.delivery_count > 1)
    INTO o_documents, o_redelivered
    FROM claimed c;
    IF o_documents IS NULL THEN
        -- p_lazy_touch > 0: write only when something changes, or when last_seen_at
        -- is older than p_lazy_touch seconds (well within the idle window), so that
        -- an empty read of a quiet stream usually writes no tuple at all.
        UPDATE pix_stream SET replay_pull = NULL, last_seen_at = now()
        WHERE id = p_stream
          AND (p_lazy_touch <= 0 OR replay_pull IS NOT NULL
               OR last_seen_at < now() - make_interval(secs => p_lazy_touch));
        o_pull_next := p_used;
        o_documents := '{}';
        o_redelivered := 0;
        RETURN;
    END IF;
    INSERT INTO pix_pull (id, stream_id, size, confirmed_at)
    VALUES (p_next, p_stream, cardinality(o_documents), NULL);
    UPDATE pix_stream SET current_pull = p_next, replay_pull = p_used, last_seen_at = now()
    WHERE id = p_stream;
    o_pull_next := p_next;
END
$$;

CREATE FUNCTION pix_continue(
    p_ispb text, p_pull text, p_next text, p_limit int, p_idle float8, p_lazy_touch float8,
    OUT o_outcome text, OUT o_pull_next text, OUT o_documents text[], OUT o_confirmed int,
    OUT o_redelivered int, OUT o_stream bigint, OUT o_expired int, OUT o_requeued int)
LANGUAGE plpgsql AS $$
DECLARE
    s record;
BEGIN
    o_confirmed := 0; o_redelivered := 0; o_expired := 0; o_requeued := 0;
    o_documents := '{}';
    SELECT st.id, st.ispb, st.current_pull, st.replay_pull, st.closed_at IS NOT NULL AS closed,
           st.last_seen_at < now() - make_interval(secs => p_idle) AS idle,
           p.confirmed_at IS NOT NULL AS current_confirmed
    INTO s
    FROM pix_pull x
    JOIN pix_stream st ON st.id = x.stream_id
    JOIN pix_pull p ON p.id = st.current_pull
    WHERE x.id = p_pull
    FOR UPDATE OF st;
    IF NOT FOUND OR s.ispb <> p_ispb THEN
        o_outcome := 'notfound';
        RETURN;
    END IF;
    o_stream := s.id;
    IF s.closed THEN
        o_outcome := 'gone';
        RETURN;
    END IF;
    IF s.idle THEN
        SELECT e.streams, e.released INTO o_expired, o_requeued FROM pix_expire(p_ispb, p_idle) e;
        o_outcome := 'gone';
        RETURN;
    END IF;
    IF p_pull = s.replay_pull THEN
        UPDATE pix_stream SET last_seen_at = now() WHERE id = s.id;
        SELECT coalesce(array_agg(pix_message_document(m) ORDER BY m.id), '{}')
        INTO o_documents FROM pix_message m WHERE m.pull_id = s.current_pull;
        o_outcome := 'replay';
        o_pull_next := s.current_pull;
        RETURN;
    END IF;
    IF p_pull <> s.current_pull THEN
        o_outcome := 'gone';
        RETURN;
    END IF;
    IF NOT s.current_confirmed THEN
        UPDATE pix_pull SET confirmed_at = now() WHERE id = p_pull AND confirmed_at IS NULL
        RETURNING size INTO o_confirmed;
        o_confirmed := coalesce(o_confirmed, 0);
    END IF;
    SELECT e.streams, e.released INTO o_expired, o_requeued FROM pix_expire(p_ispb, p_idle) e;
    SELECT c.o_pull_next, c.o_documents, c.o_redelivered
    INTO o_pull_next, o_documents, o_redelivered
    FROM pix_claim_into(p_ispb, s.id, p_pull, p_next, p_limit, p_lazy_touch) c;
    o_outcome := CASE WHEN cardinality(o_documents) > 0 THEN 'batch' ELSE 'empty' END;
END
$$;

CREATE FUNCTION pix_open(
    p_ispb text, p_pull text, p_next text, p_limit int, p_idle float8, p_max int,
    OUT o_outcome text, OUT o_pull_next text, OUT o_documents text[], OUT o_confirmed int,
    OUT o_redelivered int, OUT o_stream bigint, OUT o_expired int, OUT o_requeued int)
LANGUAGE plpgsql AS $$
BEGIN
    o_confirmed := 0; o_redelivered := 0; o_expired := 0; o_requeued := 0;
    o_documents := '{}';
    -- Serialises count-and-create of streams per ISPB (held until commit).
    PERFORM pg_advisory_xact_lock(7243, p_ispb::integer);
    SELECT e.streams, e.released INTO o_expired, o_requeued FROM pix_expire(p_ispb, p_idle) e;
    IF (SELECT count(*) FROM pix_stream WHERE ispb = p_ispb AND closed_at IS NULL) >= p_max THEN
        o_outcome := 'refused';
        RETURN;
    END IF;
    INSERT INTO pix_stream (ispb, current_pull) VALUES (p_ispb, p_pull) RETURNING id INTO o_stream;
    INSERT INTO pix_pull (id, stream_id, size, confirmed_at) VALUES (p_pull, o_stream, 0, now());
    SELECT c.o_pull_next, c.o_documents, c.o_redelivered
    INTO o_pull_next, o_documents, o_redelivered
    FROM pix_claim_into(p_ispb, o_stream, p_pull, p_next, p_limit, 0) c;
    o_outcome := CASE WHEN cardinality(o_documents) > 0 THEN 'batch' ELSE 'empty' END;
END
$$;
