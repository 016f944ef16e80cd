-- keyward schema v8 (PostgreSQL): the platform's audit chain.
-- The same tables as migrations/sqlite/0008_platform_audit.sql, in PostgreSQL types.
CREATE TABLE platform_audit_events (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    seq         BIGINT NOT NULL UNIQUE,
    at          BIGINT NOT NULL,
    actor       TEXT NOT NULL,
    action      TEXT NOT NULL,
    provider    TEXT,
    key_last4   TEXT,
    account_id  TEXT,
    kek_id      TEXT,
    detail      TEXT,
    mac         BYTEA NOT NULL
);

-- The newest link of the platform's chain (one row), locked by each append.
CREATE TABLE platform_audit_head (
    id   SMALLINT PRIMARY KEY CHECK (id = 1),
    seq  BIGINT NOT NULL,
    mac  BYTEA NOT NULL
);
