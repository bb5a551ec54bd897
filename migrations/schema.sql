-- The schema after all migrations: the source of truth a test compares the migrated database with.
CREATE TABLE events (
    seq       INTEGER PRIMARY KEY,
    time      TEXT    NOT NULL,
    actor     TEXT    NOT NULL,
    type      TEXT    NOT NULL,
    schema    INTEGER NOT NULL,
    data      TEXT    NOT NULL,
    prev_hash TEXT    NOT NULL,
    hash      TEXT    NOT NULL UNIQUE
);
CREATE INDEX events_type ON events (type);
CREATE INDEX events_time ON events (time);

CREATE TABLE users (
    id      INTEGER PRIMARY KEY,
    name    TEXT NOT NULL UNIQUE,
    created REAL NOT NULL
);

CREATE TABLE auth_keys (
    id         INTEGER PRIMARY KEY,
    prefix     TEXT    NOT NULL UNIQUE,
    hash       TEXT    NOT NULL,
    user_id    INTEGER NOT NULL,
    reusable   INTEGER NOT NULL,
    ephemeral  INTEGER NOT NULL,
    expiration REAL,
    tags       TEXT    NOT NULL,
    created    REAL    NOT NULL,
    revoked    INTEGER NOT NULL,
    used_by    TEXT    NOT NULL
);

-- approved_routes (0003) and via (0007) were added by ALTER TABLE, which SQLite records in the shape below.
CREATE TABLE nodes (
    id             INTEGER PRIMARY KEY,
    machine_key    TEXT    NOT NULL UNIQUE,
    node_key       TEXT    NOT NULL UNIQUE,
    disco_key      TEXT    NOT NULL,
    user_id        INTEGER,
    tags           TEXT    NOT NULL,
    hostname       TEXT    NOT NULL,
    os             TEXT    NOT NULL,
    given_name     TEXT    NOT NULL UNIQUE,
    name_by_admin  INTEGER NOT NULL,
    ipv4           TEXT    NOT NULL UNIQUE,
    ipv6           TEXT    NOT NULL UNIQUE,
    ephemeral      INTEGER NOT NULL,
    key_expiry     REAL,
    created        REAL    NOT NULL,
    auth_key_id    INTEGER,
    routes         TEXT    NOT NULL,
    endpoints      TEXT    NOT NULL,
    endpoint_types TEXT    NOT NULL,
    home_derp      INTEGER NOT NULL,
    online         INTEGER NOT NULL,
    last_seen      REAL,
    expired        INTEGER NOT NULL,
    logged_out     INTEGER NOT NULL
, approved_routes TEXT NOT NULL DEFAULT '[]', via INTEGER);

CREATE TABLE policy (
    id      INTEGER PRIMARY KEY CHECK (id = 1),
    text    TEXT,
    sha256  TEXT
);

-- MagicDNS settings (coord/dns.py), a projection of the DNS* events: one row once any was logged.
-- Lists are JSON: nameservers and search_domains ["..."], split [[suffix, [resolver, ...]], ...],
-- extra_records and file_records [[name, type, value], ...].
-- base_domain was added by ALTER TABLE (0004), which SQLite records in the shape below.
CREATE TABLE dns (
    id                 INTEGER PRIMARY KEY CHECK (id = 1),
    magic_dns          INTEGER NOT NULL,
    nameservers        TEXT    NOT NULL,
    split              TEXT    NOT NULL,
    search_domains     TEXT    NOT NULL,
    override_local_dns INTEGER NOT NULL,
    extra_records      TEXT    NOT NULL,
    file_records       TEXT    NOT NULL,
    seed               TEXT    NOT NULL
, base_domain TEXT NOT NULL DEFAULT '');

-- 0005: hashes of API token and OAuth client secrets (never in the event log).
CREATE TABLE credential_secrets (
    id   TEXT PRIMARY KEY,
    hash TEXT NOT NULL
);

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
