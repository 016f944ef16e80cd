-- keyward schema v6 (PostgreSQL): browser sessions in the database, and what the activity page reads.

-- A settings-page session. Only the SHA-256 of its id (hex) is stored: the id itself lives
-- only in the browser's cookie, so a copy of this table cannot be replayed as a cookie. The
-- session's CSRF token is derived from the id (never stored either). `flash` is the
-- message for the session's next page view (never any part of a key). A session ends after
-- 12 hours unused or 7 days in all (checked on every read; expired rows are deleted when
-- met and by a periodic sweep), at sign-out, or at "Sign out everywhere".
CREATE TABLE sessions (
    id_hash       TEXT PRIMARY KEY,
    user_id       TEXT NOT NULL,
    created_at    BIGINT NOT NULL,
    last_seen_at  BIGINT NOT NULL,
    flash         TEXT
);
CREATE INDEX sessions_by_user ON sessions (user_id);
CREATE INDEX sessions_by_last_seen ON sessions (last_seen_at);

-- The activity page: an account's events newest first, optionally within a month.
CREATE INDEX audit_events_by_account_at ON audit_events (account_id, at, seq);
-- A key's health: its own-key calls by outcome and time (last success, failures in 24 h).
CREATE INDEX audit_events_key_calls ON audit_events (account_id, provider, key_source, outcome, at);
