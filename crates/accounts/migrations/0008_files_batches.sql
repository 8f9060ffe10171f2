-- The OpenAI Files and Batch APIs. A file's bytes live in the server's
-- files directory under its id; its row says whose it is and until when.
-- A batch keeps each input line (its body) and, once run, its result line:
-- a server killed mid-batch resumes with the lines still pending, and a
-- line's result is written once.
CREATE TABLE files (
    id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL,
    purpose TEXT NOT NULL,
    filename TEXT NOT NULL,
    bytes BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT
);
CREATE INDEX files_user ON files (user_id, created_at);

CREATE TABLE batches (
    id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL,
    key_id TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    input_file_id TEXT NOT NULL,
    completion_window TEXT NOT NULL,
    status TEXT NOT NULL,
    metadata TEXT,
    errors TEXT,
    output_file_id TEXT,
    error_file_id TEXT,
    total BIGINT NOT NULL DEFAULT 0,
    completed BIGINT NOT NULL DEFAULT 0,
    failed BIGINT NOT NULL DEFAULT 0,
    created_at BIGINT NOT NULL,
    in_progress_at BIGINT,
    expires_at BIGINT NOT NULL,
    finalizing_at BIGINT,
    completed_at BIGINT,
    failed_at BIGINT,
    expired_at BIGINT,
    cancelling_at BIGINT,
    cancelled_at BIGINT
);
CREATE INDEX batches_user ON batches (user_id, created_at);
CREATE INDEX batches_status ON batches (status, created_at);

CREATE TABLE batch_lines (
    batch_id TEXT NOT NULL,
    line_no BIGINT NOT NULL,
    custom_id TEXT NOT NULL,
    body TEXT NOT NULL,
    -- pending, ok (a 2xx answer: the output file) or error (the error file)
    status TEXT NOT NULL,
    result TEXT,
    PRIMARY KEY (batch_id, line_no)
);

-- Per plan: how many bytes of files a user may keep, and what batch lines
-- cost against the token limits, in thousandths of the plan's price.
ALTER TABLE plans ADD COLUMN file_bytes BIGINT NOT NULL DEFAULT 1073741824;
ALTER TABLE plans ADD COLUMN batch_price_milli BIGINT NOT NULL DEFAULT 500;
