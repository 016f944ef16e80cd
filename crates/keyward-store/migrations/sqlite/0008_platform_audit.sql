-- keyward schema v8 (SQLite): the platform's audit chain.
-- The platform's own actions (shared-pool keys, KEK versions, plan changes made by the CLI)
-- are chained like an account's events (seq 1, 2, …; HMAC with the audit chain key, which is
-- not in the database), on one chain of their own.
CREATE TABLE platform_audit_events (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    seq         INTEGER NOT NULL UNIQUE,
    at          INTEGER NOT NULL,
    actor       TEXT NOT NULL,
    action      TEXT NOT NULL,
    provider    TEXT,
    key_last4   TEXT,
    account_id  TEXT,
    kek_id      TEXT,
    detail      TEXT,
    mac         BLOB NOT NULL
);

-- The newest link of the platform's chain (one row), so a truncated tail is detected.
CREATE TABLE platform_audit_head (
    id   INTEGER PRIMARY KEY CHECK (id = 1),
    seq  INTEGER NOT NULL,
    mac  BLOB NOT NULL
);
