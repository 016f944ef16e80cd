-- keyward schema v2 (SQLite): the platform's shared-pool keys and shared-pool metering.
-- Times are Unix milliseconds; credits and tokens are plain integers. Nothing here is
-- SQLite-only in spirit: the PostgreSQL migration is the same tables with BIGINT/BYTEA.

-- The platform's own key per provider, used for `shared` calls. Sealed like an account's
-- key, bound to (account id "platform", provider, key_id); a rotation overwrites the blob
-- in place (secure_delete zeroes the old cells) and draws a new key_id.
CREATE TABLE shared_keys (
    provider    TEXT PRIMARY KEY CHECK (provider IN ('anthropic', 'openai', 'google')),
    key_id      TEXT NOT NULL UNIQUE,
    sealed      BLOB NOT NULL,
    last4       TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL
);

-- Shared-pool credits of one account in one calendar month ('YYYY-MM', UTC).
-- A call reserves before it starts (credits_reserved += its max cost, only while
-- used + reserved + amount <= limit: one conditional UPDATE, so the cap holds across
-- processes) and settles after (reserved -= reservation, used += charge).
CREATE TABLE credit_periods (
    account_id        TEXT NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    period            TEXT NOT NULL,
    credits_used      INTEGER NOT NULL DEFAULT 0 CHECK (credits_used >= 0),
    credits_reserved  INTEGER NOT NULL DEFAULT 0 CHECK (credits_reserved >= 0),
    PRIMARY KEY (account_id, period)
);

-- Finished AI calls per account, month, provider and key source (shared and own alike).
CREATE TABLE usage_counters (
    account_id     TEXT NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    period         TEXT NOT NULL,
    provider       TEXT NOT NULL CHECK (provider IN ('anthropic', 'openai', 'google')),
    source         TEXT NOT NULL CHECK (source IN ('shared', 'own')),
    requests       INTEGER NOT NULL DEFAULT 0 CHECK (requests >= 0),
    input_tokens   INTEGER NOT NULL DEFAULT 0 CHECK (input_tokens >= 0),
    output_tokens  INTEGER NOT NULL DEFAULT 0 CHECK (output_tokens >= 0),
    PRIMARY KEY (account_id, period, provider, source)
);
