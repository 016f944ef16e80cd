-- keyward schema v1 (SQLite). Times are Unix milliseconds (INTEGER).

CREATE TABLE users (
    id          TEXT PRIMARY KEY,
    email       TEXT NOT NULL UNIQUE,
    created_at  INTEGER NOT NULL
);

-- Only a SHA-256 of each token is stored; the token itself is shown once.
CREATE TABLE api_tokens (
    token_hash  TEXT PRIMARY KEY,
    user_id     TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    created_at  INTEGER NOT NULL
);

CREATE TABLE accounts (
    id                   TEXT PRIMARY KEY,
    name                 TEXT NOT NULL,
    plan                 TEXT NOT NULL CHECK (plan IN ('free', 'pro', 'business')),
    -- NULL: the plan's default limit.
    shared_credit_limit  INTEGER CHECK (shared_credit_limit IS NULL OR shared_credit_limit >= 0),
    created_at           INTEGER NOT NULL
);

CREATE TABLE memberships (
    account_id  TEXT NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    user_id     TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    role        TEXT NOT NULL CHECK (role IN ('owner', 'admin', 'member')),
    created_at  INTEGER NOT NULL,
    PRIMARY KEY (account_id, user_id)
);
CREATE INDEX memberships_by_user ON memberships (user_id);

-- Which pool pays for a provider's calls. No row: 'shared'.
CREATE TABLE provider_sources (
    account_id  TEXT NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    provider    TEXT NOT NULL CHECK (provider IN ('anthropic', 'openai', 'google')),
    source      TEXT NOT NULL CHECK (source IN ('shared', 'own')),
    PRIMARY KEY (account_id, provider)
);

-- One saved key per account and provider. `sealed` is the envelope-encrypted blob, bound
-- to (account_id, provider, key_id); a rotation overwrites it in place and draws a new key_id.
CREATE TABLE provider_keys (
    account_id         TEXT NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    provider           TEXT NOT NULL CHECK (provider IN ('anthropic', 'openai', 'google')),
    key_id             TEXT NOT NULL UNIQUE,
    sealed             BLOB NOT NULL,
    last4              TEXT NOT NULL,
    created_at         INTEGER NOT NULL,
    updated_at         INTEGER NOT NULL,
    last_test_ok       INTEGER,
    last_test_at       INTEGER,
    last_test_message  TEXT,
    PRIMARY KEY (account_id, provider)
);

-- Append-only, HMAC-chained per account (seq 1, 2, …). The chain key is not in the database.
CREATE TABLE audit_events (
    id                   INTEGER PRIMARY KEY AUTOINCREMENT,
    account_id           TEXT NOT NULL,
    seq                  INTEGER NOT NULL,
    at                   INTEGER NOT NULL,
    actor                TEXT NOT NULL,
    action               TEXT NOT NULL,
    provider             TEXT,
    key_source           TEXT,
    key_last4            TEXT,
    model                TEXT,
    outcome              TEXT NOT NULL,
    detail               TEXT,
    provider_request_id  TEXT,
    input_tokens         INTEGER,
    output_tokens        INTEGER,
    feature              TEXT,
    mac                  BLOB NOT NULL,
    UNIQUE (account_id, seq)
);

-- The newest link of each account's chain, so a truncated tail is detected.
CREATE TABLE audit_heads (
    account_id  TEXT PRIMARY KEY,
    seq         INTEGER NOT NULL,
    mac         BLOB NOT NULL
);
