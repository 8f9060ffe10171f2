-- Messaging channels (WeChat). A channel user is a users row (role
-- 'channel', no password) found by its account and its id on the platform;
-- its conversation is an ordinary conversation it owns.
CREATE TABLE channel_users (
    account TEXT NOT NULL,
    external_id TEXT NOT NULL,
    user_id TEXT NOT NULL REFERENCES users(id),
    -- the conversation new messages go to (NULL: start one)
    conversation_id TEXT,
    -- JSON array: the pages of an answer not yet delivered
    pending TEXT,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (account, external_id)
);
CREATE INDEX channel_users_user ON channel_users (user_id);

-- Every message a channel received, once: the platform's retries of the
-- same message find this row, on whichever replica they land.
CREATE TABLE channel_messages (
    account TEXT NOT NULL,
    msg_key TEXT NOT NULL,
    external_id TEXT NOT NULL,
    attempts BIGINT NOT NULL,
    -- running | answered | pushing | partial | done
    status TEXT NOT NULL,
    -- the passive reply, once there is one
    reply TEXT,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (account, msg_key)
);
CREATE INDEX channel_messages_user ON channel_messages (account, external_id, status);

-- A channel's API access token: one row per account, fetched by the one
-- process holding the lease (fetching a new token invalidates the old).
CREATE TABLE channel_tokens (
    account TEXT PRIMARY KEY,
    token TEXT,
    expires_at BIGINT NOT NULL,
    lease_until BIGINT NOT NULL
);
