"""Command runner: the one door through which OS appliers touch the system.

Appliers (routes, wg, nft) take a `Runner` so tests can swap in `FakeRunner`, which records a text transcript
(one line per command, argv joined with spaces, stdin after it indented) and returns scripted outputs. The
transcript is what tests compare as golden text, so its format is part of the test contract.
"""

from __future__ import annotations

import asyncio
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from node.errors import LocalError


@dataclass(frozen=True, slots=True)
class Result:
    rc: int
    out: str
    err: str


class CommandError(LocalError):
    """A command exited non-zero while the caller asked for `check=True`."""

    def __init__(self, argv: Sequence[str], result: Result) -> None:
        self.argv = tuple(argv)
        self.result = result
        detail = result.err.strip() or result.out.strip() or "no output"
        super().__init__(f"`{shlex.join(argv)}` exited {result.rc}: {detail}")


class Runner(Protocol):
    async def run(self, argv: Sequence[str], input: bytes | None = None, check: bool = True) -> Result: ...


class SubprocessRunner:
    """Runs commands for real, optionally inside a network namespace (`ip netns exec NS ...`)."""

    def __init__(self, netns: str | None = None, timeout: float = 30.0) -> None:
        self.netns = netns
        self.timeout = timeout

    def argv_for(self, argv: Sequence[str]) -> list[str]:
        if self.netns is None:
            return list(argv)
        return ["ip", "netns", "exec", self.netns, *argv]

    async def run(self, argv: Sequence[str], input: bytes | None = None, check: bool = True) -> Result:
        full = self.argv_for(argv)
        proc = await asyncio.create_subprocess_exec(
            *full,
            stdin=asyncio.subprocess.PIPE if input is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(input), self.timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise CommandError(full, Result(-9, "", f"timed out after {self.timeout}s")) from None
        assert proc.returncode is not None
        result = Result(proc.returncode, out.decode(errors="replace"), err.decode(errors="replace"))
        if check and result.rc != 0:
            raise CommandError(full, result)
        return result


@dataclass
class FakeRunner:
    """Records every command as text and answers from a script.

    `responses` maps a command line (argv joined by spaces) to a Result or to a list of Results consumed in
    order (the last one repeats). Unknown commands succeed with empty output, so a test states only the reads
    it cares about.
    """

    responses: dict[str, Result | list[Result]] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)

    def respond(self, cmd: str, out: str = "", rc: int = 0, err: str = "") -> None:
        self.responses[cmd] = Result(rc, out, err)

    @property
    def transcript(self) -> str:
        return "".join(line + "\n" for line in self.lines)

    def clear(self) -> None:
        self.lines.clear()

    @staticmethod
    def _next(scripted: Result | list[Result]) -> Result:
        if not isinstance(scripted, list):
            return scripted
        return scripted.pop(0) if len(scripted) > 1 else scripted[0]

    async def run(self, argv: Sequence[str], input: bytes | None = None, check: bool = True) -> Result:
        cmd = " ".join(argv)
        self.lines.append(cmd)
        if input is not None:
            self.lines.extend("    " + line for line in input.decode().splitlines())
        result = self._next(self.responses.get(cmd, Result(0, "", "")))
        if check and result.rc != 0:
            raise CommandError(argv, result)
        return result
