-- Webhooks (coord/webhooks.py, coord/delivery.py). None of these tables is a projection of the event log: events
-- name an endpoint by id only, and what is kept here is delivery bookkeeping and the signing secrets.
--
-- The signing secret of each endpoint, in clear (an HMAC key cannot be stored hashed). It never enters the event
-- log, snapshots or checkpoints; the database file is 0600 from creation (coord/private.py).
CREATE TABLE webhook_secrets (
    endpoint_id TEXT PRIMARY KEY,
    secret      TEXT NOT NULL
);
-- The durable cursor: every event up to seq is done for the endpoint (delivered with a 2xx, not of its types, or
-- given up on and recorded as undeliverable below). Written only after a 2xx or a give-up.
CREATE TABLE webhook_cursors (
    endpoint_id TEXT PRIMARY KEY,
    seq         INTEGER NOT NULL
);
-- One row per delivery attempt: outcome "delivered" (2xx), "failed" (will retry) or "undeliverable" (the last
-- attempt of a batch given up on after the retry window).
CREATE TABLE webhook_deliveries (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    endpoint_id TEXT NOT NULL,
    first_seq   INTEGER NOT NULL,
    last_seq    INTEGER NOT NULL,
    events      INTEGER NOT NULL,
    attempt     INTEGER NOT NULL,
    time        REAL NOT NULL,
    status      INTEGER,
    error       TEXT NOT NULL DEFAULT '',
    outcome     TEXT NOT NULL
);
CREATE INDEX webhook_deliveries_endpoint ON webhook_deliveries (endpoint_id, id);
