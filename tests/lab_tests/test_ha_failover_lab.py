"""HA failover on the router's own self-check (issue 16): two routers for one LAN, both with `--route-probe` on
the LAN host. The primary's path to the LAN breaks while its agent, its control stream and its tunnels stay up:
its probe stops answering, it withdraws the route, and the server makes the other router primary.

Topology as in test_subnet_router_lab.py's failover tests: a LAN host (198.51.100.10) on a bridge behind ra
(198.51.100.1) and rb (198.51.100.2); alice's client c reaches it with --accept-routes.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pytest

from tests.lab import Topology
from tests.lab_tests.tailnet import SERVER_PORT, Tailnet
from tests.lab_tests.test_subnet_router_lab import ALICE, HOST, LAN, ask, server_cli, set_policy, shared_lan

pytestmark = pytest.mark.lab


def test_ha_failover_route_probe_stops_answering(tailnet: Tailnet, tmp_path: Path) -> None:
    tn, lab = tailnet, tailnet.lab
    lab.build(Topology.parse("lan: ra rb c"))
    a_lan, b_lan = shared_lan(lab, ["ra", "rb"], tmp_path)
    tn.start_server()
    set_policy(tn, tmp_path)
    for n in ("ra", "rb", "c"):
        tn.start_agent(n)
    for r in ("ra", "rb"):
        tn.up(r, tn.auth_key(ALICE), "--advertise-routes", LAN, "--advertise-tags", "tag:router",
              "--route-probe", HOST)
    tn.up("c", tn.auth_key(ALICE), "--accept-routes")
    tn.wait_for("c reaches the LAN through ra", lambda: ask(tn, "c") == a_lan, timeout=15, step=0.2)

    times = []
    for cycle in range(2):
        # ra's LAN goes away for ra alone (its interface stays up): the probe fails, the route is withdrawn
        lab.nft(lab.ns("ra"), f"""table inet {lab.prefix}cut {{
  chain out {{ type filter hook output priority -10; ip daddr {LAN} drop; }}
  chain cutfwd {{ type filter hook forward priority -10; ip daddr {LAN} drop; }}
}}
""")
        took = tn.wait_for("c reaches the LAN through rb", lambda: ask(tn, "c", 0.5) == b_lan, timeout=15, step=0.1)
        times.append(took)
        health = tn.status("ra")["Health"]
        assert any(h.startswith("routes withheld from the tailnet by the self-check: 198.51.100.0/24: route probe")
                   for h in health), health
        routes = {x["name"]: x for x in json.loads(server_cli(tn, "routes", "list", "--json"))}
        assert (routes["ra"]["online"], routes["ra"]["primary"], routes["rb"]["primary"]) == (True, [], [LAN])
        # the LAN comes back: ra offers the route again, as a standby (rb keeps it: no flapping)
        lab.exec("ra", ["nft", "delete", "table", "inet", f"{lab.prefix}cut"])
        tn.wait_for("ra offers the route again", lambda: LAN in {
            x["name"]: x for x in json.loads(server_cli(tn, "routes", "list", "--json"))}["ra"]["advertised"],
            timeout=10, step=0.5)
        assert ask(tn, "c") == b_lan
        if cycle == 0:  # swap roles for the second round: rb's LAN breaks, ra takes over
            lab.nft(lab.ns("rb"), f"""table inet {lab.prefix}cut {{
  chain out {{ type filter hook output priority -10; ip daddr {LAN} drop; }}
  chain cutfwd {{ type filter hook forward priority -10; ip daddr {LAN} drop; }}
}}
""")
            took = tn.wait_for("c reaches the LAN through ra", lambda: ask(tn, "c", 0.5) == a_lan, timeout=15,
                               step=0.1)
            times.append(took)
            lab.exec("rb", ["nft", "delete", "table", "inet", f"{lab.prefix}cut"])
            tn.wait_for("rb offers the route again", lambda: LAN in {
                x["name"]: x for x in json.loads(server_cli(tn, "routes", "list", "--json"))}["rb"]["advertised"],
                timeout=10, step=0.5)
            # ra is primary again; for the next round make rb primary by cutting ra (the loop does)
    print(f"failover on a failed route probe took {', '.join(f'{t:.2f}s' for t in times)}")


LOAD_NODES = int(os.environ.get("SHOAL_HA_LOAD_NODES", "300"))
LOAD_RATE = float(os.environ.get("SHOAL_HA_LOAD_RATE", "100"))


def test_ha_failover_under_load_killed_and_cut_primary(tailnet: Tailnet, tmp_path: Path) -> None:
    """Failover within 15 s, the server busy with LOAD_NODES other long-polls sending LOAD_RATE endpoint updates
    per second in all (tests/lab_tests/control_load.py, the control bench's client): first the primary's link to
    the server is cut; then, the first back online as a standby, the new primary's agent is killed."""
    tn, lab = tailnet, tailnet.lab
    lab.build(Topology.parse("lan: ra rb c"))
    a_lan, b_lan = shared_lan(lab, ["ra", "rb"], tmp_path)
    tn.start_server()
    set_policy(tn, tmp_path)
    log = tmp_path / "load.log"
    lab.spawn(tn.server_ns, [sys.executable, "-m", "tests.lab_tests.control_load", tn.server_addr,
                             str(SERVER_PORT), tn.auth_key("load"), str(LOAD_NODES), str(LOAD_RATE)],
              log_path=log)
    tn.wait_for("the load's streams are open", lambda: "streaming" in log.read_text(), timeout=120, step=0.5)
    for n in ("ra", "rb", "c"):
        tn.start_agent(n)
    for r in ("ra", "rb"):
        tn.up(r, tn.auth_key(ALICE), "--advertise-routes", LAN, "--advertise-tags", "tag:router")
    tn.up("c", tn.auth_key(ALICE), "--accept-routes")
    tn.wait_for("c reaches the LAN through ra", lambda: ask(tn, "c") == a_lan, timeout=15, step=0.2)

    lab.nft(lab.ns("ra"), f"""table inet {lab.prefix}cut {{
  chain out {{ type filter hook output priority -10; ip daddr {tn.server_addr} drop; }}
  chain in {{ type filter hook input priority -10; ip saddr {tn.server_addr} drop; }}
}}
""")
    cut = tn.wait_for("c reaches the LAN through rb", lambda: ask(tn, "c", 0.5) == b_lan, timeout=15, step=0.1)
    # ra's link comes back; once it is online again (a standby), rb's agent is killed
    lab.exec("ra", ["nft", "delete", "table", "inet", f"{lab.prefix}cut"])
    tn.wait_for("ra is online again", lambda: {x["name"]: x for x in json.loads(server_cli(
        tn, "routes", "list", "--json"))}["ra"]["online"], timeout=30, step=0.5)
    lab.kill(tn.agents.pop("rb"), signal.SIGKILL)
    killed = tn.wait_for("c reaches the LAN through ra again", lambda: ask(tn, "c", 0.5) == a_lan, timeout=15,
                         step=0.1)
    load = [line for line in log.read_text().splitlines() if line.startswith("updates")]
    print(f"failover under load ({LOAD_NODES} long-polls, {LOAD_RATE:g} updates/s; {load[-1] if load else '-'}): "
          f"cut link {cut:.2f}s, killed agent {killed:.2f}s")
    assert load, log.read_text()[-2000:]
