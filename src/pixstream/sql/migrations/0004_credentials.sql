-- Credentials: bearer tokens and client certificates, each bound to one ISPB
-- (or, for a token only, to an administrator), shared by every host.
--
-- A token is 256 random bits (secrets.token_urlsafe(32)); only its SHA-256 is
-- kept. A plain, unkeyed hash suffices for such a secret, unlike a password:
-- there is no dictionary to try, a brute force of 2^256 is out of reach, and a
-- copy of this table (a backup, a replica, a read-only role) gives a thief
-- nothing to present. Lookup by hash is constant-time in the sense that
-- matters: the time it takes depends on the hash, never on how much of the
-- presented token matches a stored one; access.py compares the found hash
-- once more with hmac.compare_digest.
--
-- A certificate is kept as the SHA-256 fingerprint of its DER encoding, which
-- is what the TLS proxy's verified client certificate is mapped by. It is no
-- secret (the proxy verified the private key); the column is named for tokens.

CREATE TABLE pix_credential (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    ispb          text CHECK (ispb ~ '^[0-9]{8}$'),
    kind          text NOT NULL CHECK (kind IN ('token', 'cert')),
    admin         boolean NOT NULL DEFAULT false,
    label         text NOT NULL DEFAULT '',
    secret_hash   bytea NOT NULL UNIQUE CHECK (length(secret_hash) = 32),
    -- Certificates only: the subject, for people reading `flask cert list`.
    subject       text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    -- Written at most once a minute per credential, from each process's cache.
    last_used_at  timestamptz,
    expires_at    timestamptz,
    revoked_at    timestamptz,
    -- An administrator is a person with a token, not an institution: it may
    -- call the util routes but reads no ISPB's payments. Every other
    -- credential belongs to exactly one ISPB.
    CHECK (CASE WHEN admin THEN kind = 'token' AND ispb IS NULL ELSE ispb IS NOT NULL END),
    CHECK ((kind = 'cert') = (subject IS NOT NULL))
);

CREATE INDEX pix_credential_ispb_idx ON pix_credential (ispb);

-- Every process caches the credentials it validated. The statements that
-- create or revoke a credential (queries.sql: insert_credential,
-- revoke_credential) announce its id on the channel pix_credentials in the
-- same transaction, and every host drops it from its cache within
-- milliseconds of the commit. Statements, not a trigger: the announcement
-- is in plain sight where the change is made, and last_used_at, written every
-- minute, announces nothing. A change made by hand must be announced by hand,
-- or it reaches the caches only within their 30 s backstop:
--     UPDATE pix_credential SET revoked_at = now() WHERE id = 42;
--     SELECT pg_notify('pix_credentials', '42');
