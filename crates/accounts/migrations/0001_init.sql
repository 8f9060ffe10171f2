-- Portable SQL: the same migration runs on SQLite and PostgreSQL.
CREATE TABLE plans (
    name TEXT PRIMARY KEY,
    requests_per_minute BIGINT NOT NULL,
    tokens_per_minute BIGINT NOT NULL,
    tokens_per_day BIGINT NOT NULL,
    max_context BIGINT NOT NULL,
    -- comma-separated model names, or '*' for every model
    models TEXT NOT NULL,
    priority BIGINT NOT NULL
);

INSERT INTO plans VALUES ('free', 20, 20000, 200000, 4096, '*', 0);
INSERT INTO plans VALUES ('plus', 200, 200000, 5000000, 32768, '*', 10);

CREATE TABLE users (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    role TEXT NOT NULL,
    plan TEXT NOT NULL REFERENCES plans(name),
    created_at BIGINT NOT NULL
);

CREATE TABLE api_keys (
    id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL REFERENCES users(id),
    -- sha256 of the secret; the secret itself is never stored
    hash TEXT NOT NULL UNIQUE,
    prefix TEXT NOT NULL,
    name TEXT NOT NULL,
    -- comma-separated model names the key may use; NULL: the plan's models
    models TEXT,
    expires_at BIGINT,
    revoked_at BIGINT,
    created_at BIGINT NOT NULL
);

-- One row per request; the request id as key makes recording idempotent.
CREATE TABLE usage (
    request_id TEXT PRIMARY KEY,
    key_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    model TEXT NOT NULL,
    day TEXT NOT NULL,
    ts BIGINT NOT NULL,
    prompt_tokens BIGINT NOT NULL,
    cached_tokens BIGINT NOT NULL,
    completion_tokens BIGINT NOT NULL
);

CREATE INDEX usage_user_day ON usage (user_id, day);
CREATE INDEX usage_key_day ON usage (key_id, day);
