-- The web app: passwords and browser sessions, conversations (a tree of
-- messages: editing or regenerating adds a sibling), personas.
ALTER TABLE users ADD COLUMN password_hash TEXT;

CREATE TABLE sessions (
    -- sha256 of the cookie's secret; the secret itself is never stored
    id_hash TEXT PRIMARY KEY,
    user_id TEXT NOT NULL REFERENCES users(id),
    csrf TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL
);

CREATE INDEX sessions_user ON sessions (user_id);

CREATE TABLE conversations (
    id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL REFERENCES users(id),
    title TEXT NOT NULL,
    system_prompt TEXT NOT NULL,
    model TEXT NOT NULL,
    -- JSON object: temperature, top_p, max_tokens, ...
    params TEXT NOT NULL,
    -- the message the conversation currently shows the branch of
    current_leaf TEXT,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);

CREATE INDEX conversations_user ON conversations (user_id, updated_at);

CREATE TABLE messages (
    id TEXT PRIMARY KEY,
    conversation_id TEXT NOT NULL REFERENCES conversations(id),
    parent_id TEXT,
    role TEXT NOT NULL,
    content TEXT NOT NULL,
    -- done | streaming | incomplete | error
    status TEXT NOT NULL,
    model TEXT,
    created_at BIGINT NOT NULL,
    -- order of creation within the conversation (ties on created_at)
    seq BIGINT NOT NULL
);

CREATE INDEX messages_conversation ON messages (conversation_id, seq);

CREATE TABLE personas (
    id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL REFERENCES users(id),
    name TEXT NOT NULL,
    prompt TEXT NOT NULL,
    created_at BIGINT NOT NULL
);

CREATE INDEX personas_user ON personas (user_id);
