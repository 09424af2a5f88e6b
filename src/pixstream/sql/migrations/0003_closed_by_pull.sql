-- The id a DELETE closed the stream with: repeating that DELETE (its answer
-- lost) answers 200 again, while every other id of the stream answers 410.
ALTER TABLE pix_stream ADD COLUMN closed_by_pull text;
