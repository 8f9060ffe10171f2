-- Accounts can wait for an admin's approval, be disabled, or be deleted
-- (a tombstone: the row stays so usage rows keep their user for accounting;
-- name, password, keys, sessions and conversations go).
ALTER TABLE users ADD COLUMN status TEXT NOT NULL DEFAULT 'active';

-- Server-wide settings an admin changes at run time (the sign-up policy).
CREATE TABLE settings (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

-- How many choices (`n`) one request of the plan may ask for: each is a
-- sequence in the batch, so a plan must not fill it alone.
ALTER TABLE plans ADD COLUMN max_n BIGINT NOT NULL DEFAULT 4;

-- Who may read (search, ask) each knowledge base: '*' everyone, '' admins
-- only, else comma-separated user ids. No row: everyone.
CREATE TABLE kb_readers (
    kb TEXT PRIMARY KEY,
    readers TEXT NOT NULL
);
