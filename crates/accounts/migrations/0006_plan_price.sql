-- What a plan's usage costs against its token limits, in thousandths of
-- full price (1000: every token counts once; 500: half). Multiplies the
-- weight each request carries (e.g. batch lines, which cost less).
ALTER TABLE plans ADD COLUMN price_milli BIGINT NOT NULL DEFAULT 1000;
