"""Small frozen value types that name things: sessions, paths, nodes.

Why: a bare ``bytes`` or ``int`` can be confused with any other; these types
validate once, at construction, and print in a short, greppable form.
"""

from __future__ import annotations

from typing import Callable

import attrs

#: Spec 3.1 needs a stable identity anchor; 128 random bits, issued by the gateway,
#: make collisions and guessing infeasible.
SESSION_ID_BYTES = 16

RandomBytes = Callable[[int], bytes]


def _check_session_id(_inst: object, _attr: object, value: bytes) -> None:
    if not isinstance(value, bytes) or len(value) != SESSION_ID_BYTES:
        raise ValueError(f"SessionId must be {SESSION_ID_BYTES} bytes")


@attrs.frozen(order=True)
class SessionId:
    """The session's identity anchor; never changes across reattach (Property 1)."""

    raw: bytes = attrs.field(validator=_check_session_id)

    @classmethod
    def generate(cls, random_bytes: RandomBytes) -> SessionId:
        return cls(random_bytes(SESSION_ID_BYTES))

    @classmethod
    def from_hex(cls, text: str) -> SessionId:
        try:
            raw = bytes.fromhex(text)
        except ValueError as exc:
            raise ValueError(f"SessionId is not hex: {text!r}") from exc
        return cls(raw)

    @property
    def hex(self) -> str:
        return self.raw.hex()

    @property
    def short(self) -> str:
        """First 8 hex digits: enough to tell sessions apart on a screen."""
        return self.raw[:4].hex()

    def __str__(self) -> str:
        return self.hex


#: Path ids travel in one byte on the wire; 0 is reserved for "no path".
MAX_PATH_ID = 255


def _check_path_id(_inst: object, _attr: object, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_PATH_ID:
        raise ValueError(f"PathId must be an int in 1..{MAX_PATH_ID}, got {value!r}")


@attrs.frozen(order=True, cache_hash=True)  # a dict key on every input: hashed once
class PathId:
    """A candidate transport path (one local interface towards the gateway)."""

    value: int = attrs.field(validator=_check_path_id)

    def __str__(self) -> str:
        return f"p{self.value}"


@attrs.frozen
class Binding:
    """An active transport binding: which path and which remote endpoint.

    ``endpoint`` is opaque to the core (a ``(host, port)`` tuple in drivers);
    it only needs equality.  A session holds at most one (Property 2).
    """

    path: PathId
    endpoint: tuple[str, int]

    def __str__(self) -> str:
        host, port = self.endpoint
        return f"{self.path}@{host}:{port}"
