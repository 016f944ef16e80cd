-- keyward schema v5 (PostgreSQL): the product's services, its own ids, and the webhook outbox.

-- The product's own ids for accounts and users: what the provisioning API is keyed by.
-- NULL for accounts and users made by the CLI or at first start.
ALTER TABLE accounts ADD COLUMN external_id TEXT;
CREATE UNIQUE INDEX accounts_by_external_id ON accounts (external_id) WHERE external_id IS NOT NULL;
ALTER TABLE users ADD COLUMN external_id TEXT;
CREATE UNIQUE INDEX users_by_external_id ON users (external_id) WHERE external_id IS NOT NULL;

-- The product's services (drafting, Autopilot, its provisioning job): a name, scopes and
-- the SHA-256 of a `kws_` token, like a user's. A revoked service keeps its row (revoked_at
-- set) so audit events naming it still resolve; its name may then be used again.
CREATE TABLE services (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    -- Space-separated: ai:call, accounts:manage, audit:read.
    scopes      TEXT NOT NULL,
    token_hash  TEXT NOT NULL UNIQUE,
    created_at  BIGINT NOT NULL,
    revoked_at  BIGINT
);
CREATE UNIQUE INDEX services_by_live_name ON services (name) WHERE revoked_at IS NULL;

-- A service's call may name the user it acts for; the service itself is the actor.
ALTER TABLE audit_events ADD COLUMN on_behalf_of TEXT;

-- Consecutive calls on the saved key that failed with a key diagnosis (invalid, no credit,
-- missing permission, reported as leaked); reset by a call that works or a new key.
ALTER TABLE provider_keys ADD COLUMN fail_streak BIGINT NOT NULL DEFAULT 0;

-- The limit a period's reservations were checked against, and the highest shared-credit
-- threshold (80, 100) already announced for it, so each is announced once.
ALTER TABLE credit_periods ADD COLUMN credit_limit BIGINT;
ALTER TABLE credit_periods ADD COLUMN notified_percent BIGINT NOT NULL DEFAULT 0;

-- Events for the product's webhook endpoints, written in the transaction of the change that
-- causes them and delivered at least once, in order per account, by whichever node claims
-- them first (claimed_by/claimed_until is a lease, so a dead node's claim expires).
CREATE TABLE webhook_outbox (
    id               BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- The Standard Webhooks `webhook-id`: the same on every retry, so receivers can dedupe.
    event_id         TEXT NOT NULL UNIQUE,
    account_id       TEXT NOT NULL,
    type             TEXT NOT NULL,
    -- The JSON body exactly as it is signed and sent. Never any part of a key but last4.
    payload          TEXT NOT NULL,
    created_at       BIGINT NOT NULL,
    attempts         BIGINT NOT NULL DEFAULT 0,
    next_attempt_at  BIGINT NOT NULL,
    -- Endpoints that accepted it so far (comma-separated indices into KEYWARD_WEBHOOK_URLS).
    delivered_to     TEXT NOT NULL DEFAULT '',
    delivered_at     BIGINT,
    -- Set when retries gave up (24 h); `keyward webhooks replay` clears it.
    dead_at          BIGINT,
    last_error       TEXT,
    claimed_by       TEXT,
    claimed_until    BIGINT
);
CREATE INDEX webhook_outbox_pending ON webhook_outbox (account_id, id)
    WHERE delivered_at IS NULL AND dead_at IS NULL;
