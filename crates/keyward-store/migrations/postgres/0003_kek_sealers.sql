-- keyward schema v3 (PostgreSQL): which KEK version each serving gateway seals new keys to.
-- A gateway refreshes its row every few seconds, and only names a new version once no save
-- sealed to the old one is still in flight; `keyward kek retire` refuses a version that a
-- recently reported gateway still names, so a key is never sealed to a destroyed KEK.
CREATE TABLE kek_sealers (
    node_id      TEXT PRIMARY KEY,
    -- The versions it may seal to right now, comma-separated: the current primary, and an
    -- old one while saves sealed to it are still in flight.
    kek_ids      TEXT NOT NULL,
    reported_at  BIGINT NOT NULL
);
