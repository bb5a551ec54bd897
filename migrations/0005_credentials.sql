-- API access tokens and OAuth clients: the hash of each secret, by credential id. Kept out of the event log (its
-- events name a credential by id and prefix only), so the audit log holds nothing a secret can be checked against.
CREATE TABLE credential_secrets (
    id   TEXT PRIMARY KEY,
    hash TEXT NOT NULL
);
