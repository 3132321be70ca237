"""atheris target: the trace decoder (core/trace.py), on arbitrary lines (issue 15, "Inputs that never crash").

Every input is read the way ``jvpn-trio replay`` reads a trace file (UTF-8, undecodable bytes
replaced) and handed to both decoders.  The properties, from the module's docstring:

* ``decode_input_untrusted`` and ``decode_line_untrusted`` return, or raise :class:`BadTrace`
  whose message names the line (``"line 7: ..."``); anything else is a crash;
* what they return is what they say: a TraceEntry holds a known input type, a known side and a
  finite ``now``; a session start or outputs line holds a 32-hex-digit session;
* a decoded input survives its own encoder: encoding it and decoding the result gives the same
  entry back (a trace replays what was recorded).  Session starts are not checked so: the
  decoder accepts starts the encoder never writes (fuzz/README.md, "Findings").

The hypothesis twins that run in CI: tests/core/test_trace.py (decode_input_untrusted) and
tests/properties/test_trace_fuzz.py (both decoders, whole-trace lines, the re-encoding).
atheris is not a dependency of the project; fuzz/README.md has the commands.
"""

from __future__ import annotations

import json
import math
import pathlib
import typing
from typing import Any

import atheris  # type: ignore[import-untyped,import-not-found,unused-ignore]
from fuzzing import run

with atheris.instrument_imports():
    import attrs

    from jvpn_trio.core.ids import Binding, PathId, SessionId
    from jvpn_trio.core.ownership import OwnershipRecord
    from jvpn_trio.core.states import ReasonCode
    from jvpn_trio.core.trace import (
        INPUT_TYPES,
        SIDES,
        BadTrace,
        Outputs,
        SessionStart,
        TraceEntry,
        decode_input_untrusted,
        decode_line_untrusted,
        encode_input,
        encode_session_start,
    )

#: The line number handed to the decoders; every BadTrace message must start with it.
LINENO = 7
PREFIX = f"line {LINENO}: "
#: A recorded trace: the seed corpus (``--seeds DIR``) takes one line of each kind from it.
RECORDED_TRACE = pathlib.Path(__file__).resolve().parent.parent / "tests" / "data" / "traces" / "pair-storm.trace.jsonl"




def decoded_or_none(decode: typing.Callable[..., Any], line: str) -> Any | None:
    """What ``decode`` returns, or None after a BadTrace naming the line; any other exception escapes."""
    try:
        return decode(line, lineno=LINENO)
    except BadTrace as exc:
        if not str(exc).startswith(PREFIX):
            raise AssertionError(f"BadTrace does not name the line: {exc}") from None
        return None


def check_entry(entry: TraceEntry) -> None:
    if entry.side not in SIDES or type(entry.event) not in INPUT_TYPES.values():
        raise AssertionError(f"decoded an impossible entry: {entry!r}")
    if not isinstance(entry.now, float) or not math.isfinite(entry.now):
        raise AssertionError(f"now is not a finite float: {entry.now!r}")
    again = decode_input_untrusted(encode_input(entry.side, entry.now, entry.event, session=entry.session))
    if again != entry:
        raise AssertionError(f"re-encoding changed the entry: {entry!r} -> {again!r}")


def test_one_input(data: bytes) -> None:
    line = data.decode("utf-8", errors="replace")
    entry = decoded_or_none(decode_input_untrusted, line)
    if entry is not None:
        check_entry(entry)
    item = decoded_or_none(decode_line_untrusted, line)
    if isinstance(item, TraceEntry):
        check_entry(item)
    elif isinstance(item, SessionStart):
        if item.side not in SIDES or len(item.session) != 32 or not math.isfinite(item.now):
            raise AssertionError(f"decoded an impossible session start: {item!r}")
    elif isinstance(item, Outputs):
        if item.side not in SIDES or len(item.session) != 32 or not math.isfinite(item.now):
            raise AssertionError(f"decoded impossible outputs: {item!r}")
    elif item is not None:
        raise AssertionError(f"decode_line_untrusted returned a {type(item).__name__}")


#: A valid value per field type, to build a seed line for each input the recorded trace lacks.
SAMPLE_VALUES: dict[Any, Any] = {
    PathId: PathId(1),
    SessionId: SessionId(bytes(range(16))),
    ReasonCode: ReasonCode.BAD_MAC,
    Binding: Binding(path=PathId(2), endpoint=("192.0.2.1", 51820)),
    OwnershipRecord: OwnershipRecord(session_id=SessionId(bytes(range(16))), owner="gw-a", revision=3),
    bytes: b"\x01\x02",
    tuple[str, int]: ("198.51.100.1", 40001),
    str: "REATTACH",
    bool: True,
    int: 5,
}


def sample_line(name: str) -> str:
    """An input line for ``name`` with every field set (optional ones to a value, not None)."""
    cls = INPUT_TYPES[name]
    hints = typing.get_type_hints(cls)
    fields = {}
    for field in attrs.fields(cls):
        hint = hints[field.name]
        inner = [a for a in typing.get_args(hint) if a is not type(None)] if typing.get_origin(hint) else []
        fields[field.name] = SAMPLE_VALUES[inner[0] if len(inner) == 1 else hint]
    return encode_input("gateway", 2.5, cls(**fields), session=SessionId(bytes(16)).hex)


def write_seeds(directory: pathlib.Path) -> int:
    """The seed corpus: the first recorded line of each kind, a line for every other input, a full session start."""
    directory.mkdir(parents=True, exist_ok=True)
    kinds: dict[str, str] = {}
    for line in RECORDED_TRACE.read_text(encoding="utf-8").splitlines():
        body = json.loads(line)
        kind = body.get("input") or ("start" if "start" in body else "out")
        kinds.setdefault(str(kind), line)
    for name in INPUT_TYPES:
        kinds.setdefault(name, sample_line(name))
    start = SessionStart(
        side="client",
        now=1.0,
        session=SessionId(bytes(range(16))).hex,
        policy={"probe_interval_ms": 100},
        node_id="gw-a",
        held_revision=4,
        handshake_binding=SAMPLE_VALUES[Binding],
        previous_session=SessionId(bytes(range(1, 17))).hex,
        switch_times=(0.5, 0.75),
        reconnect_by="LINK_DOWN",
    )
    kinds["full start"] = encode_session_start(start)
    for number, line in enumerate(kinds.values()):
        (directory / f"seed-{number:02d}").write_text(line, encoding="utf-8")
    return len(kinds)


def main() -> None:
    run(test_one_input, write_seeds)


if __name__ == "__main__":
    main()
