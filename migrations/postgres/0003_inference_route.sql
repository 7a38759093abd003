-- The route each logged request was sent to (`/v1/embeddings`, ...).
-- Rows logged before this column existed read as an empty route.
ALTER TABLE inference_logs ADD COLUMN route TEXT NOT NULL DEFAULT '';
