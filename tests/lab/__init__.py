"""Network-namespace lab for integration tests (see docs/lab.md)."""

from tests.lab.lab import Lab, LabError, Node, Router, remove_prefix, sweep
from tests.lab.topo import Lan, Topology, easy_nat_pair, hard_nat_pair, mixed, one_lan

__all__ = [
    "Lab", "LabError", "Lan", "Node", "Router", "Topology", "easy_nat_pair", "hard_nat_pair", "mixed",
    "one_lan", "remove_prefix", "sweep",
]
