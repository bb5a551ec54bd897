"""Shoal SSH: the agent's SSH server, authenticating peers by their tailnet identity (see decide.py, server.py)."""
