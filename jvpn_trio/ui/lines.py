"""Plain event lines: one per event, for ``--no-tui``, pipes and logs read by people.

Printing happens in a worker thread from the sink's own bounded
subscription, so a terminal that stops reading drops lines (counted by the
sink) and never delays a decision.
"""

from __future__ import annotations

from typing import TextIO

import trio

from jvpn_trio.core.actions import EmitEvent
from jvpn_trio.drivers import event_sink

#: Events buffered for the plain-line printer; a stalled terminal drops lines, never decisions.
PRINTER_CAPACITY = 1024
_SHOWN_DETAILS = ("from_state", "to_state", "from_path", "to_path", "path", "verdict", "binding", "endpoint", "by", "applied")


def format_event_line(event: EmitEvent) -> str:
    """One plain line per event, for --no-tui or when stdout is not a terminal."""
    extra = " ".join(f"{k}={v}" for k, v in event.details if v is not None and k in _SHOWN_DETAILS)
    return (
        f"{event.t:10.3f} {event.role.value:7} {event.kind.value:17} v{event.version:<4} "
        f"{event.reason.value:26} {extra}".rstrip()
    )


async def print_events(sink: event_sink.EventSink, stream: TextIO) -> None:
    """Print each event from the sink's own bounded subscription, writing in a worker thread.

    If the terminal stalls, the write blocks only that thread; the subscription
    fills and drops (counted by the sink), while the session keeps deciding.
    """

    def write(line: str) -> None:
        try:
            print(line, file=stream, flush=True)
        except (BrokenPipeError, OSError):
            pass  # a closed terminal must not stop the VPN

    async for event in sink.subscribe(PRINTER_CAPACITY, name="printer"):
        await trio.to_thread.run_sync(write, format_event_line(event))
