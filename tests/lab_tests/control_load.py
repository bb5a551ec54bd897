"""Load on a lab shoal-server for the HA failover test: N simulated nodes on sealed long-polls (the control
bench's client, scripts/bench/control `Node`), sending endpoint updates at a total rate.

    python -m tests.lab_tests.control_load HOST PORT AUTH_KEY NODES UPDATES_PER_S

Runs in the server's namespace until killed. Prints `streaming N` once every stream is open, then one line
`updates K errors E` every 5 s.
"""

from __future__ import annotations

import asyncio
import importlib.machinery
import importlib.util
import json
import os
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from coord import wire

ROOT = Path(__file__).resolve().parents[2]


def bench_module() -> Any:
    os.environ["SHOAL_BENCH_NOREEXEC"] = "1"
    path = str(ROOT / "scripts" / "bench" / "control")
    loader = importlib.machinery.SourceFileLoader("shoal_bench_control", path)
    spec = importlib.util.spec_from_loader("shoal_bench_control", loader)
    assert spec is not None
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod


async def run(host: str, port: int, auth_key: str, count: int, rate: float) -> None:
    bench = bench_module()
    bench.HOST = host  # the bench's post() and streams dial it
    with urllib.request.urlopen(f"http://{host}:{port}/key", timeout=5) as r:
        server_pub = wire.parse_key(json.loads(r.read())["publicKey"], "mkey")
    nodes = [bench.Node(server_pub, 10000 + i) for i in range(count)]
    sem = asyncio.Semaphore(16)

    async def reg(n: Any) -> None:
        async with sem:
            await n.register(auth_key, port)

    await asyncio.gather(*(reg(n) for n in nodes))
    opened = asyncio.Semaphore(64)
    watch: dict[str, Any] = {"key": None, "count": 0, "last": 0.0}
    tasks = [asyncio.create_task(n.stream(port, opened, watch)) for n in nodes]
    while sum(n.full for n in nodes) < count:
        if any(t.done() for t in tasks):
            raise RuntimeError("a stream ended during setup")
        await asyncio.sleep(0.2)
    print(f"streaming {count}", flush=True)
    sent = errors = 0
    i = 0
    t0 = last = time.monotonic()
    while True:
        # one endpoint update per tick, spread over the nodes, `rate` per second in all
        n = nodes[i % count]
        i += 1
        ep = f"198.51.100.{i % 250 + 1}:{40000 + i % 20000}"
        req = wire.MapRequest(node_key=bytes(n.node.public_key), disco_key=bytes(n.disco.public_key),
                              stream=False, endpoints=(ep,), endpoint_types=(1,), home_derp=1)
        _, sealed = n.seal(req.to_json())
        try:
            status, _ = await bench.post(n.path("map"), sealed, port)
            sent += 1
            errors += status != 200
        except OSError:
            errors += 1
        now = time.monotonic()
        if now - last >= 5:
            print(f"updates {sent} errors {errors} rate {sent / (now - t0):.1f}/s", flush=True)
            last = now
        await asyncio.sleep(max(0.0, t0 + i / rate - time.monotonic()))


if __name__ == "__main__":
    h, p, key, n, r = sys.argv[1:6]
    asyncio.run(run(h, int(p), key, int(n), float(r)))
