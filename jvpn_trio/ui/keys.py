"""Keys: bytes from the terminal -> commands, read from a Trio task in cbreak mode.

Theory of operation
-------------------
:func:`terminal_keys` puts the terminal on ``fd`` into *cbreak* mode (the
useful part of raw mode for a dashboard: no echo, no line buffering, one
byte at a time) and always restores the saved attributes on the way out,
whether the block ends normally, by an exception, by a cancellation or by
KeyboardInterrupt.  It keeps ISIG, so Ctrl-C still raises SIGINT (the
composition root turns that into an explicit close), and output
post-processing, so rich's newlines still return the carriage.

:func:`serve_keys` waits with ``trio.lowlevel.wait_readable`` and then reads
what is there; it never sets O_NONBLOCK on the descriptor, because stdin
usually shares its open file description with stdout and a non-blocking
stdout would break every other writer.  After ``wait_readable`` the read
returns at once (VMIN=1).

:func:`decode_keys` is pure: the up and down arrows move a selection
(the path picker, the selected event), other escape sequences (function
keys, other arrows) are skipped whole, a lone ESC closes an overlay (help,
picker, details), Enter selects, the digits 1-9 come out as ints (a row of
the path picker), unknown keys are ignored.
"""

from __future__ import annotations

import enum
import os
import termios
import tty
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Union

import trio

#: Bytes taken per read (a paste of many keys is decoded in order).
READ_SIZE = 64
ESC = 0x1B


class Command(enum.Enum):
    QUIT = "quit"
    PIN = "pin"  # the attached UI opens the path picker; the in-process one cycles p1, p2, ..., unpinned
    UNPIN = "unpin"
    REEVALUATE = "reevaluate"
    DISCONNECT = "disconnect"
    RECONNECT = "reconnect"
    TOGGLE_DETAIL = "toggle_detail"
    TOGGLE_HELP = "toggle_help"
    CLOSE_HELP = "close_help"  # Esc: closes whatever overlay is open (help, picker, details)
    UP = "up"
    DOWN = "down"
    ENTER = "enter"
    DETAILS = "details"


#: A decoded key: a command, or a digit 1-9 (a row of the path picker).
Key = Union[Command, int]

KEYMAP: dict[str, Command] = {
    "q": Command.QUIT,
    "Q": Command.QUIT,
    "p": Command.PIN,
    "u": Command.UNPIN,
    "s": Command.REEVALUATE,
    "r": Command.REEVALUATE,
    "d": Command.DISCONNECT,
    "c": Command.RECONNECT,
    "e": Command.TOGGLE_DETAIL,
    "i": Command.DETAILS,
    "?": Command.TOGGLE_HELP,
    "h": Command.TOGGLE_HELP,
    "k": Command.UP,
    "j": Command.DOWN,
    "\r": Command.ENTER,
    "\n": Command.ENTER,
}
#: Arrow keys: the final byte of their CSI / SS3 sequence (``ESC [ A`` is up).
ARROWS: dict[int, Command] = {ord("A"): Command.UP, ord("B"): Command.DOWN}

#: The key reference, shown by ``?`` and documented in docs/tui.md.
KEY_HELP: tuple[tuple[str, str], ...] = (
    ("q", "quit this UI (the agent goes on); in the demo and `up`'s own UI: close the session and end"),
    ("p", "pin a path: a picker (↑/↓ or 1-9, Enter pins, Esc cancels); an override within policy"),
    ("u", "unpin: the policy chooses the path again"),
    ("r s", "ask the supervisor for a re-evaluation now"),
    ("d c", "disconnect (close the session, start none; asks to confirm) / reconnect"),
    ("↑ ↓ Enter i", "select an event; Enter or i shows all its details (Esc closes)"),
    ("e", "events: toggle all kinds with their details / headlines only"),
    ("? h", "toggle this help (Esc closes it)"),
    ("Ctrl-C", "as q; a second Ctrl-C stops at once"),
)


def decode_keys(data: bytes) -> list[Key]:
    """The commands (and digits) in ``data``, in order.  Pure."""
    out: list[Key] = []
    i = 0
    while i < len(data):
        byte = data[i]
        if byte == ESC:
            if i + 1 < len(data) and data[i + 1] in b"[O":
                # CSI / SS3 sequence: skip to its final byte (0x40..0x7E); plain up/down arrows count.
                start = i + 2
                i = start
                while i < len(data) and not 0x40 <= data[i] <= 0x7E:
                    i += 1
                if i < len(data) and i == start and data[i] in ARROWS:
                    out.append(ARROWS[data[i]])
                i += 1
                continue
            out.append(Command.CLOSE_HELP)
            i += 1
            continue
        if 0x31 <= byte <= 0x39:  # 1..9
            out.append(byte - 0x30)
            i += 1
            continue
        command = KEYMAP.get(chr(byte))
        if command is not None:
            out.append(command)
        i += 1
    return out


@contextmanager
def terminal_keys(fd: int) -> Iterator[None]:
    """Cbreak mode on ``fd`` for the block; the saved mode comes back on every exit path."""
    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd, termios.TCSANOW)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


async def serve_keys(fd: int, on_command: Callable[[Key], None]) -> None:
    """Read keys from ``fd`` until end of file, calling ``on_command`` for each command."""
    while True:
        await trio.lowlevel.wait_readable(fd)
        try:
            data = os.read(fd, READ_SIZE)
        except BlockingIOError:
            continue
        if not data:
            return
        for command in decode_keys(data):
            on_command(command)
