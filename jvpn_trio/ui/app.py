"""The terminal side of the live UI: screens, frame-rate bounds, and plain-line mode.

The live UI itself is :mod:`jvpn_trio.ui.attached`: ``up`` in the
foreground, bare ``jvpn-trio`` and the demo all attach to the agent over its
control socket, so there is one UI and one way in.  This module holds what
that UI draws on:

- :class:`LiveScreen` wraps ``rich.live.Live(auto_refresh=False)`` (no
  refresh thread) and does every terminal write in a worker thread
  (``trio.to_thread.run_sync``), so a terminal that stops reading blocks that
  thread and the frame loop, never the Trio thread.  :class:`RecordingScreen`
  keeps the last frame (tests, the pictures in docs/tui.md).
- Without a terminal (or with ``--no-tui``) :class:`PlainPrinter` prints one
  line per event (:func:`jvpn_trio.ui.lines.format_event_line`), writing in a
  worker thread, dropping and counting what a stalled stream cannot take.
"""

from __future__ import annotations

import sys
from typing import Protocol

import trio
from rich.console import Console, RenderableType
from rich.live import Live

from jvpn_trio.ui.lines import (
    use_tui as use_tui,  # the choice is made without rich: serve and up import it from there
)

#: At most ten frames a second: a person cannot read faster, and each frame costs a terminal write.
MAX_FPS = 10.0
#: Events the UI keeps for the events pane (a bounded deque; older ones fall off).
EVENT_HISTORY = 256
#: How long a key's feedback message stays in the footer.
MESSAGE_S = 3.0


class Screen(Protocol):
    """Where frames go.  ``show`` may take as long as the terminal needs; the UI waits for it."""

    async def start(self) -> None: ...

    async def show(self, renderable: RenderableType) -> None: ...

    async def stop(self) -> None: ...


class LiveScreen:
    """``rich.live.Live`` without its refresh thread; every write happens in a worker thread."""

    def __init__(self, console: Console, *, alt_screen: bool = True) -> None:
        self.console = console
        self._live = Live(
            console=console,
            screen=alt_screen,
            auto_refresh=False,
            redirect_stdout=False,
            redirect_stderr=False,
            transient=False,
            vertical_overflow="crop",
        )

    async def start(self) -> None:
        await trio.to_thread.run_sync(self._live.start, abandon_on_cancel=True)

    async def show(self, renderable: RenderableType) -> None:
        await trio.to_thread.run_sync(self._update, renderable, abandon_on_cancel=True)

    def _update(self, renderable: RenderableType) -> None:
        self._live.update(renderable, refresh=True)

    async def stop(self) -> None:
        await trio.to_thread.run_sync(self._live.stop, abandon_on_cancel=True)


class RecordingScreen:
    """A screen that keeps the last frame (tests, and docs/tui.md's picture)."""

    def __init__(self) -> None:
        self.frames = 0
        self.last: RenderableType | None = None
        self.started = False
        self.stopped = False

    async def start(self) -> None:
        self.started = True

    async def show(self, renderable: RenderableType) -> None:
        await trio.lowlevel.checkpoint()
        self.frames += 1
        self.last = renderable

    async def stop(self) -> None:
        self.stopped = True


def terminal_key_fd() -> int | None:
    """stdin's descriptor if it is a terminal we can read keys from."""
    stdin = sys.stdin
    try:
        if stdin is not None and stdin.isatty():
            return stdin.fileno()
    except (ValueError, OSError):  # closed, or replaced by a capture object
        pass
    return None


