-- Several `hanlin serve` replicas on one database. Times here are in
-- milliseconds of the database's clock (PostgreSQL) so that a replica
-- whose own clock is off cannot stretch or cut a window or a lease.

-- Each replica, with its heartbeat: a replica whose heartbeat is older
-- than the lease is dead, and what it held (token holds, streaming
-- replies, leases) is released.
CREATE TABLE replicas (
    id TEXT PRIMARY KEY,
    started_ms BIGINT NOT NULL,
    heartbeat_ms BIGINT NOT NULL,
    -- 1 while the replica drains (takes no new work)
    draining BIGINT NOT NULL
);

-- Requests counted against requests-per-minute (shared limiter).
CREATE TABLE limit_requests (
    user_id TEXT NOT NULL,
    at_ms BIGINT NOT NULL
);
CREATE INDEX limit_requests_user ON limit_requests (user_id, at_ms);

-- Tokens a running request holds (its worst case) until its usage row is
-- final; while the hold is live it counts instead of the usage row.
CREATE TABLE limit_holds (
    request_id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL,
    replica_id TEXT NOT NULL,
    day TEXT NOT NULL,
    at_ms BIGINT NOT NULL,
    tokens BIGINT NOT NULL
);
CREATE INDEX limit_holds_user ON limit_holds (user_id, day);

-- Work one replica at a time does (the batch runner, feed polling).
CREATE TABLE leases (
    name TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    until_ms BIGINT NOT NULL
);

-- The replica writing a streaming reply.
ALTER TABLE messages ADD COLUMN replica_id TEXT;

CREATE INDEX usage_user_ts ON usage (user_id, ts);

-- Knowledge-base changes, in order, on a database replicas share
-- (PostgreSQL): each replica applies the rows after its cursor to its own
-- index, so a document added on one is searchable on all.
CREATE TABLE kb_log (
    seq BIGINT PRIMARY KEY,
    kb TEXT NOT NULL,
    -- create | add | feed
    op TEXT NOT NULL,
    -- JSON: the settings, the documents, the feed
    body TEXT NOT NULL,
    replica_id TEXT NOT NULL,
    at_ms BIGINT NOT NULL
);
