-- How many times a logged stream was continued on another replica after
-- its replica failed mid-answer (0 for every row logged before).
ALTER TABLE inference_logs ADD COLUMN continuations INTEGER NOT NULL DEFAULT 0;
