-- The MagicDNS base domain an admin set at run time (DNSBaseDomainSet); '' = the server config's base_domain.
ALTER TABLE dns ADD COLUMN base_domain TEXT NOT NULL DEFAULT '';
