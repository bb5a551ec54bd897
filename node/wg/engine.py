"""One interface over the two WireGuard engines, and the automatic choice between them."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Protocol

from node.wg.config import DeviceState, WgConfig


class Engine(Protocol):
    name: str
    iface: str

    async def start(self) -> None: ...
    async def set(self, cfg: WgConfig) -> None: ...
    async def get(self) -> DeviceState: ...
    async def stop(self) -> None: ...


def kernel_available(probe: bool = True) -> bool:
    """Whether this kernel has WireGuard: loaded already, or loadable (found by creating a throwaway link)."""
    if Path("/sys/module/wireguard").exists():
        return True
    if not probe:
        return False
    try:
        from pyroute2 import IPRoute
        from pyroute2.netlink.exceptions import NetlinkError
    except ImportError:
        return False
    name = f"shprobe{os.getpid() % 100000}"
    with IPRoute() as ipr:
        try:
            ipr.link("add", ifname=name, kind="wireguard")
        except NetlinkError:
            return False
        with contextlib.suppress(NetlinkError):
            ipr.link("del", index=ipr.link_lookup(ifname=name)[0])
    return True


def choose_engine(
    iface: str, *, netns: str | None = None, prefer: str | None = None, **go_kw: object
) -> Engine:
    """The kernel engine where the kernel has WireGuard (and we run in the target namespace), else
    wireguard-go.

    `prefer` ("kernel" or "wireguard-go") overrides the choice.
    """
    from node.wg.go import GoEngine

    use_kernel = prefer == "kernel" or (prefer is None and netns is None and kernel_available())
    if use_kernel:
        from node.wg.kernel import KernelEngine

        return KernelEngine(iface)
    return GoEngine(iface, netns=netns, **go_kw)  # type: ignore[arg-type]
