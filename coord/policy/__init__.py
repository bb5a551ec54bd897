"""Access policy: Tailscale's HuJSON policy format parsed, checked and compiled (sans-IO)."""
