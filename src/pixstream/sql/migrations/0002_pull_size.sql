-- How many messages each pull delivered, so that confirming a batch can be
-- counted without touching its messages.
ALTER TABLE pix_pull ADD COLUMN size integer NOT NULL DEFAULT 0 CHECK (size >= 0);
