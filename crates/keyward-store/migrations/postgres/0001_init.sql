-- keyward schema v1 (PostgreSQL). The same tables as migrations/sqlite/0001_init.sql, in
-- PostgreSQL types. Times are Unix milliseconds (BIGINT).

CREATE TABLE users (
    id          TEXT PRIMARY KEY,
    email       TEXT NOT NULL UNIQUE,
    created_at  BIGINT NOT NULL
);

-- Only a SHA-256 of each token is stored; the token itself is shown once.
CREATE TABLE api_tokens (
    token_hash  TEXT PRIMARY KEY,
    user_id     TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    created_at  BIGINT NOT NULL
);

CREATE TABLE accounts (
    id                   TEXT PRIMARY KEY,
    name                 TEXT NOT NULL,
    plan                 TEXT NOT NULL CHECK (plan IN ('free', 'pro', 'business')),
    -- NULL: the plan's default limit.
    shared_credit_limit  BIGINT CHECK (shared_credit_limit IS NULL OR shared_credit_limit >= 0),
    created_at           BIGINT NOT NULL
);

CREATE TABLE memberships (
    account_id  TEXT NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    user_id     TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    role        TEXT NOT NULL CHECK (role IN ('owner', 'admin', 'member')),
    created_at  BIGINT NOT NULL,
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
-- to (account_id, provider, key_id); a rotation overwrites it and draws a new key_id.
-- PostgreSQL keeps the old row version until a vacuum: the store vacuums this table after
-- every rotation or removal (see PgStore::purge_removed).
CREATE TABLE provider_keys (
    account_id         TEXT NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    provider           TEXT NOT NULL CHECK (provider IN ('anthropic', 'openai', 'google')),
    key_id             TEXT NOT NULL UNIQUE,
    sealed             BYTEA NOT NULL,
    last4              TEXT NOT NULL,
    created_at         BIGINT NOT NULL,
    updated_at         BIGINT NOT NULL,
    last_test_ok       BOOLEAN,
    last_test_at       BIGINT,
    last_test_message  TEXT,
    PRIMARY KEY (account_id, provider)
);

-- Append-only, HMAC-chained per account (seq 1, 2, …). The chain key is not in the database.
-- Ids come from a sequence: never reused, and increasing along each account's chain
-- (appends to one chain are serialized by its head row's lock).
CREATE TABLE audit_events (
    id                   BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account_id           TEXT NOT NULL,
    seq                  BIGINT NOT NULL,
    at                   BIGINT NOT NULL,
    actor                TEXT NOT NULL,
    action               TEXT NOT NULL,
    provider             TEXT,
    key_source           TEXT,
    key_last4            TEXT,
    model                TEXT,
    outcome              TEXT NOT NULL,
    detail               TEXT,
    provider_request_id  TEXT,
    input_tokens         BIGINT,
    output_tokens        BIGINT,
    feature              TEXT,
    mac                  BYTEA NOT NULL,
    UNIQUE (account_id, seq)
);
-- audit_page reads an account's newest events by id.
CREATE INDEX audit_events_by_account_id ON audit_events (account_id, id);

-- The newest link of each account's chain, so a truncated tail is detected. Also the lock
-- that serializes appends to one chain across gateway nodes (SELECT … FOR UPDATE).
CREATE TABLE audit_heads (
    account_id  TEXT PRIMARY KEY,
    seq         BIGINT NOT NULL,
    mac         BYTEA NOT NULL
);
