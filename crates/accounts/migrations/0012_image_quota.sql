-- A daily image quota per plan, and the images a running request holds
-- against it (PostgreSQL's shared limits).
ALTER TABLE plans ADD COLUMN images_per_day BIGINT NOT NULL DEFAULT 1000;
UPDATE plans SET images_per_day = 50 WHERE name = 'free';
ALTER TABLE limit_holds ADD COLUMN images BIGINT NOT NULL DEFAULT 0;
