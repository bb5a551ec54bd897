-- MagicDNS settings (coord/dns.py), a projection of the DNS* events: one row once any was logged.
-- Lists are JSON: nameservers and search_domains ["..."], split [[suffix, [resolver, ...]], ...],
-- extra_records and file_records [[name, type, value], ...].
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
);
