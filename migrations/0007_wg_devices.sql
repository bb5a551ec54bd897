-- Plain-WireGuard devices (`shoal-server devices add-wg`): the hub node that carries a device's traffic.
ALTER TABLE nodes ADD COLUMN via INTEGER;
