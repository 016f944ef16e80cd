-- keyward schema v7 (PostgreSQL): shared-pool reservations held as leases.

-- One row per shared call in flight that reserved credits (their sum per account and period
-- is in credit_periods.credits_reserved). The holding node renews `expires_at` while the
-- call runs. The row is deleted when the call is settled, or when the lease is released
-- because its holder died (expired, or the node restarted): then the credits return and
-- the call is audited as error:abandoned from the columns below. An identity: an id is
-- never reused, so a late settlement cannot meet another call's lease.
CREATE TABLE reservation_leases (
    id            BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account_id    TEXT NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    period        TEXT NOT NULL,
    amount        BIGINT NOT NULL CHECK (amount >= 0),
    -- The holder: its stable node id and the id of its current run.
    node          TEXT NOT NULL,
    run           TEXT NOT NULL,
    expires_at    BIGINT NOT NULL,
    created_at    BIGINT NOT NULL,
    -- The call, for its audit event if abandoned.
    actor         TEXT NOT NULL,
    provider      TEXT NOT NULL,
    model         TEXT NOT NULL,
    key_source    TEXT NOT NULL,
    feature       TEXT,
    on_behalf_of  TEXT
);
CREATE INDEX reservation_leases_by_expiry ON reservation_leases (expires_at);
CREATE INDEX reservation_leases_by_node ON reservation_leases (node, run);
