-- Usage carries units, not only tokens: which endpoint the request came
-- through, audio seconds (in milliseconds), images and their diffusion
-- steps, and the price weight the request was charged at (per mille:
-- 1000 is full price; batch lines pay less). Daily quotas count
-- (prompt + completion) tokens times the weight.
ALTER TABLE usage ADD COLUMN endpoint TEXT NOT NULL DEFAULT '';
ALTER TABLE usage ADD COLUMN audio_ms BIGINT NOT NULL DEFAULT 0;
ALTER TABLE usage ADD COLUMN images BIGINT NOT NULL DEFAULT 0;
ALTER TABLE usage ADD COLUMN image_steps BIGINT NOT NULL DEFAULT 0;
ALTER TABLE usage ADD COLUMN weight_milli BIGINT NOT NULL DEFAULT 1000;
