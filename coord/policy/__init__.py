"""Access policy: Tailscale's HuJSON policy format parsed, checked and compiled (sans-IO).

Entry points for the server (`shoal-server policy set/get/history/check/diff`):

- `parse(text, filename) -> Policy`, raising `PolicyError` (str: "file:line:col: path: reason").
- `check(text, tailnet=None, filename) -> dict`: the `policy check --json` object; `render_check` for text.
- `diff(old_text | None, new_text, nodes, roles) -> dict`; `render_diff` for text.
- `PolicyEngine(policy | None, nodes, roles)`: incremental peers and filters; `upsert`, `remove`, `peers`,
  `filter`, `set_roles`.
- `tag_allowed(policy, user, tag, ...)`, `route_approved(...)`, `exit_node_approved(...)`: tagOwners and
  autoApprovers.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from .approve import exit_node_approved, route_approved, tag_allowed
from .check import check, render_check, rules_to, run_tests, tailnet_state
from .compile import FILTER_ALLOW_ALL, PolicyEngine, PolicyNode
from .diff import diff_engines, diff_policies, render_diff
from .hujson import PolicyError
from .model import Policy
from .parse import parse

__all__ = [
    "FILTER_ALLOW_ALL",
    "Policy",
    "PolicyEngine",
    "PolicyError",
    "PolicyNode",
    "check",
    "diff",
    "diff_engines",
    "diff_policies",
    "exit_node_approved",
    "parse",
    "render_check",
    "render_diff",
    "route_approved",
    "rules_to",
    "run_tests",
    "tag_allowed",
    "tailnet_state",
]


def diff(
    old_text: str | bytes | None,
    new_text: str | bytes,
    nodes: Iterable[PolicyNode],
    roles: Mapping[str, Iterable[str]] | None = None,
    filename: str = "policy.hujson",
) -> dict[str, Any]:
    """What-if of `new_text` against the tailnet; raises PolicyError if new_text is invalid."""
    old = parse(old_text, "current policy") if old_text is not None else None
    return diff_policies(old, parse(new_text, filename), nodes, roles)
