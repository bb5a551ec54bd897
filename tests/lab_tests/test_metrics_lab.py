"""Metrics in the lab (issue 23.1): a real tailnet (shoal-server, two shoald + wireguard-go, nftables), a real
Prometheus in the server's namespace scraping the server's loopback metrics listener and answering a query
through /api/v1/query, and the agents' GET /metrics (on their local API socket) checked by promtool and by what
the lab did: peers by path, handshake ages, packets the policy's filter dropped."""

from __future__ import annotations

import json
import re
import subprocess
import time
import urllib.parse
from pathlib import Path

import pytest

from tests.lab import Topology
from tests.lab.lab import LabError
from tests.lab_tests.tailnet import Tailnet
from tests.lab_tests.test_policy import set_policy

pytestmark = pytest.mark.lab

METRICS_PORT = 9470
PROM_PORT = 9090
# a@ may reach b@ on TCP 22 only (and so ping it): b's pings to a are dropped by a's filter.
POLICY = """{
  "acls": [{"action": "accept", "src": ["a@example.com"], "proto": "tcp", "dst": ["b@example.com:22"]}],
}
"""


def agent_metrics(tn: Tailnet, name: str) -> str:
    p = tn.lab.exec(name, ["curl", "-sf", "--unix-socket", str(tn.socket(name)), "http://local/metrics"])
    return p.stdout


def value(text: str, series: str) -> float:
    m = re.search(rf"^{re.escape(series)} (\S+)$", text, re.M)
    assert m, f"no {series} in:\n{text}"
    return float(m.group(1))


def promtool(text: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)


def prom_query(tn: Tailnet, q: str) -> list[dict[str, object]]:
    url = f"http://127.0.0.1:{PROM_PORT}/api/v1/query?" + urllib.parse.urlencode({"query": q})
    body = json.loads(tn.lab.exec(tn.server_ns, ["curl", "-sf", url]).stdout)
    assert body["status"] == "success", body
    result: list[dict[str, object]] = body["data"]["result"]
    return result


def test_metrics_lab_prometheus_scrapes_server_and_agents_report(tailnet: Tailnet, tmp_path: Path) -> None:
    tn, lab = tailnet, tailnet.lab
    lab.build(Topology.parse("lan: a b"))
    tn.start_server("--metrics-listen", f"127.0.0.1:{METRICS_PORT}")
    for n in ("a", "b"):
        tn.start_agent(n)
        tn.up(n, tn.auth_key(f"{n}@example.com"))
    a_ip = tn.ip("a")
    assert tn.ping("b", a_ip), "b cannot ping a before the policy"

    # The agents: a well-formed exposition; two direct peers, recent handshakes.
    for n in ("a", "b"):
        text = agent_metrics(tn, n)
        checked = promtool(text)
        assert checked.returncode == 0 and checked.stdout == "" and checked.stderr == "", (n, checked)
    text = agent_metrics(tn, "a")
    assert value(text, 'shoal_agent_state{state="Running"}') == 1
    assert value(text, 'shoal_agent_peers{path="direct"}') == 1
    assert value(text, 'shoal_agent_handshake_age_seconds_bucket{le="180"}') == 1
    assert value(text, "shoal_agent_peers_without_handshake") == 0

    # The policy's filter drops b's pings at a, and a's counter says how many.
    policy = tmp_path / "policy.hujson"
    policy.write_text(POLICY)
    set_policy(tn, policy)
    tn.wait_for("b's ping dropped", lambda: not tn.ping("b", a_ip, wait=1), timeout=10)
    series = 'shoal_agent_filter_dropped_packets_total{reason="policy"}'
    before = value(agent_metrics(tn, "a"), series)
    assert not tn.ping("b", a_ip, count=3, wait=1, interval=0.2)
    after = value(agent_metrics(tn, "a"), series)
    assert after >= before + 3, (before, after)

    # A real Prometheus in the server's namespace scrapes the server's loopback listener every second.
    conf = tmp_path / "prometheus.yml"
    conf.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: shoal-server\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{METRICS_PORT}']\n"
    )
    lab.spawn(tn.server_ns, ["prometheus", f"--config.file={conf}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{PROM_PORT}", "--log.level=warn"],
              log_path=tmp_path / "prometheus.log")
    q = 'shoal_nodes{job="shoal-server",state="online"}'
    deadline, result = time.monotonic() + 40, []
    while time.monotonic() < deadline:
        try:
            result = prom_query(tn, q)
        except LabError:
            result = []  # not listening yet (curl failed)
        if result:
            break
        time.sleep(0.5)
    print(f"prometheus /api/v1/query {q}: {json.dumps(result)}")
    assert len(result) == 1
    sample = result[0]["value"]
    assert isinstance(sample, list) and sample[1] == "2"
    sessions = prom_query(tn, 'shoal_map_sessions{job="shoal-server"}')
    assert [r["value"][1] for r in sessions] == ["2"]  # type: ignore[index]
    rate = prom_query(tn, 'sum(shoal_events_appended_total{job="shoal-server"})')
    assert float(rate[0]["value"][1]) >= 6  # type: ignore[index]  # 2 users, 2 keys, 2 nodes, policy, ...
