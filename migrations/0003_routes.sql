-- Subnet routes: the routes approved for each node (by an admin or autoApprovers), advertised or not.
ALTER TABLE nodes ADD COLUMN approved_routes TEXT NOT NULL DEFAULT '[]';
