-- Messages, streams and the pulls (Pull-Next ids) that bind batches to streams.
--
-- A message is queued while pull_id is NULL, in flight while its pull is
-- unconfirmed, and collected once its pull is confirmed. Only a stream's
-- current pull can be unconfirmed, so returning a stream's batch to the queue
-- is one UPDATE of the rows bound to that pull.

CREATE TABLE pix_message (
    id                     bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    end_to_end_id          text NOT NULL UNIQUE CHECK (end_to_end_id ~ '^E[0-9]{8}[0-9]{12}[A-Za-z0-9]{11}$'),
    valor                  numeric(17, 2) NOT NULL CHECK (valor > 0),
    payer_name             text NOT NULL,
    payer_cpf_cnpj         text NOT NULL CHECK (payer_cpf_cnpj ~ '^([0-9]{11}|[0-9]{14})$'),
    payer_ispb             text NOT NULL CHECK (payer_ispb ~ '^[0-9]{8}$'),
    payer_agencia          text NOT NULL CHECK (payer_agencia ~ '^[0-9]{4}$'),
    payer_conta            text NOT NULL,
    payer_tipo_conta       text NOT NULL CHECK (payer_tipo_conta IN ('CACC', 'SVGS', 'SLRY', 'TRAN')),
    recipient_name         text NOT NULL,
    recipient_cpf_cnpj     text NOT NULL CHECK (recipient_cpf_cnpj ~ '^([0-9]{11}|[0-9]{14})$'),
    recipient_ispb         text NOT NULL CHECK (recipient_ispb ~ '^[0-9]{8}$'),
    recipient_agencia      text NOT NULL CHECK (recipient_agencia ~ '^[0-9]{4}$'),
    recipient_conta        text NOT NULL,
    recipient_tipo_conta   text NOT NULL CHECK (recipient_tipo_conta IN ('CACC', 'SVGS', 'SLRY', 'TRAN')),
    campo_livre            text NOT NULL DEFAULT '',
    tx_id                  text NOT NULL,
    paid_at                timestamptz NOT NULL,
    inserted_at            timestamptz NOT NULL DEFAULT now(),
    pull_id                text,
    delivery_count         integer NOT NULL DEFAULT 0
);

-- The claim reads the oldest queued rows of one ISPB. Queued rows are a small,
-- moving subset of a table that only grows, so the index holds just them:
-- the claim stays an index scan whatever the size of the history.
CREATE INDEX pix_message_queued_idx ON pix_message (recipient_ispb, id) WHERE pull_id IS NULL;

-- Confirmation, replay and release all find a batch by its pull.
CREATE INDEX pix_message_pull_idx ON pix_message (pull_id) WHERE pull_id IS NOT NULL;

CREATE TABLE pix_stream (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    ispb          text NOT NULL CHECK (ispb ~ '^[0-9]{8}$'),
    opened_at     timestamptz NOT NULL DEFAULT now(),
    last_seen_at  timestamptz NOT NULL DEFAULT now(),
    closed_at     timestamptz,
    close_reason  text CHECK (close_reason IN ('deleted', 'expired')),
    -- The Pull-Next handed out last; the only pull whose batch may be unconfirmed.
    current_pull  text NOT NULL,
    -- The id whose repeat replays the current answer; NULL once current_pull was used.
    replay_pull   text,
    CHECK ((closed_at IS NULL) = (close_reason IS NULL))
);

-- Counting a stream against the limit and finding idle streams touch open streams only.
CREATE INDEX pix_stream_open_idx ON pix_stream (ispb, last_seen_at) WHERE closed_at IS NULL;

-- Every Pull-Next ever issued, so that an old id answers 410 rather than 404.
CREATE TABLE pix_pull (
    id            text PRIMARY KEY CHECK (id ~ '^[a-z0-9]{12,64}$'),
    stream_id     bigint NOT NULL REFERENCES pix_stream (id),
    issued_at     timestamptz NOT NULL DEFAULT now(),
    confirmed_at  timestamptz
);

CREATE INDEX pix_pull_stream_idx ON pix_pull (stream_id);

-- Deferred to the commit because a claim binds messages to a pull id before
-- that pull exists: claim_batch sets pull_id on the rows it takes, and only
-- when it took some does advance_stream insert the pix_pull row, later in the
-- same transaction. An empty claim (every long poll that waits) binds nothing
-- and so inserts no pull row at all.
ALTER TABLE pix_message
    ADD CONSTRAINT pix_message_pull_fk FOREIGN KEY (pull_id) REFERENCES pix_pull (id)
    DEFERRABLE INITIALLY DEFERRED;

-- The message exactly as the protocol shows it: valor keeps its two decimals
-- (numeric is written as-is), the time is UTC with milliseconds and a Z.
CREATE FUNCTION pix_message_document(m pix_message) RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT row_to_json(doc)::text FROM (
        SELECT m.end_to_end_id AS "endToEndId",
               m.valor AS "valor",
               (SELECT row_to_json(p) FROM (SELECT m.payer_name AS "nome",
                    m.payer_cpf_cnpj AS "cpfCnpj", m.payer_ispb AS "ispb",
                    m.payer_agencia AS "agencia", m.payer_conta AS "contaTransacional",
                    m.payer_tipo_conta AS "tipoConta") p) AS "pagador",
               (SELECT row_to_json(r) FROM (SELECT m.recipient_name AS "nome",
                    m.recipient_cpf_cnpj AS "cpfCnpj", m.recipient_ispb AS "ispb",
                    m.recipient_agencia AS "agencia", m.recipient_conta AS "contaTransacional",
                    m.recipient_tipo_conta AS "tipoConta") r) AS "recebedor",
               m.campo_livre AS "campoLivre",
               m.tx_id AS "txId",
               to_char(m.paid_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"')
                   AS "dataHoraPagamento"
    ) doc
$$;

-- One notification per recipient ISPB per statement (COPY included), never one
-- per row: a 100,000-row COPY for one ISPB wakes its collectors once.
CREATE FUNCTION pix_notify_inserted() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('pix_inserted', ispb)
    FROM (SELECT DISTINCT recipient_ispb::text AS ispb FROM inserted) AS recipients;
    RETURN NULL;
END
$$;

CREATE TRIGGER pix_message_inserted
    AFTER INSERT ON pix_message
    REFERENCING NEW TABLE AS inserted
    FOR EACH STATEMENT EXECUTE FUNCTION pix_notify_inserted();
