-- keyward schema v2 (PostgreSQL): the platform's shared-pool keys and shared-pool metering.
-- The same tables as migrations/sqlite/0002_metering.sql, in PostgreSQL types.

-- The platform's own key per provider, used for `shared` calls. Sealed like an account's
-- key, bound to (account id "platform", provider, key_id); a rotation overwrites the blob
-- and draws a new key_id (old row versions are vacuumed away, as for provider_keys).
CREATE TABLE shared_keys (
    provider    TEXT PRIMARY KEY CHECK (provider IN ('anthropic', 'openai', 'google')),
    key_id      TEXT NOT NULL UNIQUE,
    sealed      BYTEA NOT NULL,
    last4       TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    updated_at  BIGINT NOT NULL
);

-- Shared-pool credits of one account in one calendar month ('YYYY-MM', UTC).
-- A call reserves before it starts (credits_reserved += its max cost, only while
-- used + reserved + amount <= limit: one conditional UPDATE, which PostgreSQL re-checks
-- against the locked row, so the cap holds across nodes) and settles after.
CREATE TABLE credit_periods (
    account_id        TEXT NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    period            TEXT NOT NULL,
    credits_used      BIGINT NOT NULL DEFAULT 0 CHECK (credits_used >= 0),
    credits_reserved  BIGINT NOT NULL DEFAULT 0 CHECK (credits_reserved >= 0),
    PRIMARY KEY (account_id, period)
);

-- Finished AI calls per account, month, provider and key source (shared and own alike).
CREATE TABLE usage_counters (
    account_id     TEXT NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    period         TEXT NOT NULL,
    provider       TEXT NOT NULL CHECK (provider IN ('anthropic', 'openai', 'google')),
    source         TEXT NOT NULL CHECK (source IN ('shared', 'own')),
    requests       BIGINT NOT NULL DEFAULT 0 CHECK (requests >= 0),
    input_tokens   BIGINT NOT NULL DEFAULT 0 CHECK (input_tokens >= 0),
    output_tokens  BIGINT NOT NULL DEFAULT 0 CHECK (output_tokens >= 0),
    PRIMARY KEY (account_id, period, provider, source)
);
