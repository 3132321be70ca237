"""Recording what the session cores were fed and what they answered (``--record FILE``).

A trace is JSON lines (``core/trace.py``): a *start* line when a machine is
created (with its full policy, so the recording replays under exactly that
policy), then for every core call the input line followed by an *out* line
with the actions it returned.  ``jvpn-trio replay`` feeds the inputs to
fresh machines and compares every action.

Writing never slows a decision: lines go into a bounded channel drained by a
writer task; if it is full the recording stops with a marker line saying
how much is missing, so a replay reports an incomplete trace instead of a
false divergence.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Protocol

import trio

from jvpn_trio.core.trace import SessionStart, encode_input, encode_outputs, encode_session_start

#: Lines waiting for the writer.
RECORD_CAPACITY = 65_536


class Recorder(Protocol):
    def started(self, start: SessionStart, actions: list[Any]) -> None: ...

    def step(self, side: str, session: str, now: float, event: Any, actions: list[Any]) -> None: ...


class _ChannelRecorder:
    def __init__(self, send: trio.MemorySendChannel[str]) -> None:
        self._send = send
        self.dropped = 0

    def _put(self, *lines: str) -> None:
        """Queue lines in order; once one does not fit, it and everything after it are counted lost."""
        if self.dropped:
            self.dropped += len(lines)
            return
        for index, line in enumerate(lines):
            try:
                self._send.send_nowait(line)
            except trio.WouldBlock:
                self.dropped += len(lines) - index
                return

    def started(self, start: SessionStart, actions: list[Any]) -> None:
        self._put(encode_session_start(start), encode_outputs(start.side, start.now, start.session, actions))

    def step(self, side: str, session: str, now: float, event: Any, actions: list[Any]) -> None:
        self._put(encode_input(side, now, event, session=session), encode_outputs(side, now, session, actions))


@asynccontextmanager
async def open_recorder(path: Path | None) -> AsyncIterator[Recorder | None]:
    """A recorder writing to ``path`` for the duration of the block (None: no recording)."""
    if path is None:
        yield None
        return
    send, receive = trio.open_memory_channel[str](RECORD_CAPACITY)
    recorder = _ChannelRecorder(send)

    async def writer() -> None:
        async with await trio.open_file(path, "a", encoding="utf-8") as out:
            async for line in receive:
                await out.write(line + "\n")
            if recorder.dropped:
                await out.write(f'{{"incomplete": {recorder.dropped}}}\n')

    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer)
        try:
            yield recorder
        finally:
            send.close()
