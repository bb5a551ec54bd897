"""The node's errors: one root, split by whose fault it is (h11's Local/Remote split).

    NodeError
    ├── LocalError   this node: its state files, configuration, OS commands, the WireGuard engine, a request
    │                to the local API it refuses
    └── RemoteError  the network: a coordination server that refuses or answers nonsense, a peer's or relay's
                     malformed packet, a server's packet filter that cannot be rendered

Callers catch ``NodeError`` for "anything from the node". Parse errors that were ValueErrors stay ValueErrors
too. A malformed control message is ``coord.wire.WireError`` (the protocol's own error; coord cannot import
this package); the agent treats it as remote.
"""

from __future__ import annotations


class NodeError(Exception):
    """Anything the node raises on purpose."""


class LocalError(NodeError):
    """This node's own state, configuration or OS is at fault, or a local request is refused."""


class RemoteError(NodeError):
    """Input from the network (the coordination server, a peer, a relay) is malformed or refused."""
