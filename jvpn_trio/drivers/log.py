"""The drivers' log lines: one place for how they are written and how often.

Failures of the machine (a route refused, an interface gone, a socket error)
can repeat many times a second; each is counted by the driver that met it,
and only the lines are limited, per subject, by :class:`LineLimiter`.
"""

from __future__ import annotations

import sys
from typing import Hashable


def stderr_line(line: str) -> None:
    """The drivers' default log: one ``jvpn-trio: ...`` line on stderr."""
    print(f"jvpn-trio: {line}", file=sys.stderr, flush=True)


class LineLimiter:
    """At most one line per key per ``interval_s``, counting those held back.  Pure: ``now`` is given.

    Shared by the drivers that report failures of the machine (routes, the path manager,
    path sockets): every failure is counted by its owner, only the lines are limited.
    """

    def __init__(self, interval_s: float) -> None:
        self._interval_s = interval_s
        self._last: dict[Hashable, float] = {}
        self._held: dict[Hashable, int] = {}
        self.suppressed = 0

    def admit(self, key: Hashable, now: float) -> int | None:
        """None: hold this line back; else how many lines for ``key`` were held back before it."""
        last = self._last.get(key)
        if last is not None and now - last < self._interval_s:
            self._held[key] = self._held.get(key, 0) + 1
            self.suppressed += 1
            return None
        self._last[key] = now
        return self._held.pop(key, 0)

    def line(self, key: Hashable, text: str, *, now: float) -> str | None:
        """``text`` to log now, naming the lines held back before it; None to hold it back."""
        held = self.admit(key, now)
        if held is None:
            return None
        return f"{text} ({held} more like it not shown)" if held else text
