"""atheris target: every untrusted parser in core/wire.py, on arbitrary bytes (issue 15, "Inputs that never crash").

The first byte of an input picks one check (:data:`CHECKS`), the rest is the datagram or plaintext.
The properties are the module's own promises (its docstring):

* a ``*_untrusted`` parser returns, or raises :class:`BadFrame` with a non-empty ``reason``;
  anything else (``struct.error``, ``IndexError``, an attrs ``ValueError``) is a crash;
* encoding is canonical: whatever decodes encodes back to the very bytes it came from;
* the hot-path helpers agree with the full decoders (``parse_transport_untrusted`` with
  ``decode_transport_untrusted``, ``peek_*`` with the fields they peek at).

The hypothesis twin that runs in CI is tests/properties/test_wire_fuzz.py.  atheris is not a
dependency of the project; fuzz/README.md has the commands (seed corpus, dictionary, figures).
"""

from __future__ import annotations

import ipaddress
import json
import pathlib
from collections.abc import Callable
from typing import Any

import atheris  # type: ignore[import-untyped,import-not-found,unused-ignore]
from fuzzing import run

with atheris.instrument_imports():
    from jvpn_trio.core import wire
    from jvpn_trio.core.wire import BadFrame, MessageType

#: The golden frames the unit tests pin: the seed corpus (``--seeds DIR``) is built from them.
GOLDEN_FRAMES = pathlib.Path(__file__).resolve().parent.parent / "tests" / "data" / "golden" / "wire_frames.json"


def decoded_or_none(decode: Callable[[bytes], Any], data: bytes) -> Any | None:
    """What ``decode`` returns, or None after a well-formed BadFrame; any other exception escapes (a crash)."""
    try:
        return decode(data)
    except BadFrame as exc:
        if not isinstance(exc.reason, str) or not exc.reason or str(exc) != exc.reason:
            raise AssertionError(f"BadFrame without a reason: {exc!r}") from None
        return None


def round_trip(decode: Callable[[bytes], Any], encode: Callable[[Any], bytes]) -> Callable[[bytes], None]:
    """A check: ``decode`` keeps the contract, and what it returns encodes back to the same bytes."""

    def check(data: bytes) -> None:
        msg = decoded_or_none(decode, data)
        if msg is not None and encode(msg) != data:
            raise AssertionError(f"not canonical: {data.hex()} decodes to {msg!r}, which encodes differently")

    return check


#: Every transport and handshake type, in a fixed order, for the plaintext dispatcher's type byte.
ALL_TYPES = tuple(MessageType)


def check_plaintext_dispatcher(data: bytes) -> None:
    """``decode_plaintext_untrusted`` under any header type (handshake types included: BadFrame("type"))."""
    if not data:
        return
    msg_type, plaintext = ALL_TYPES[data[0] % len(ALL_TYPES)], data[1:]
    msg = decoded_or_none(lambda b: wire.decode_plaintext_untrusted(msg_type, b), plaintext)
    if msg is not None and wire.encode_plaintext(msg) != (msg_type, plaintext):
        raise AssertionError(f"plaintext not canonical under {msg_type.name}: {plaintext.hex()}")


def check_peek_type(data: bytes) -> None:
    msg_type = decoded_or_none(wire.peek_type_untrusted, data)
    if msg_type is not None and (data[0] != wire.PROTOCOL_VERSION or msg_type != data[1]):
        raise AssertionError(f"peek_type_untrusted read {msg_type!r} from {data[:2].hex()}")


def check_transport_parsers_agree(data: bytes) -> None:
    """The hot path's ``parse_transport_untrusted`` accepts exactly what ``decode_transport_untrusted`` does."""
    try:
        fields = wire.parse_transport_untrusted(data)
    except BadFrame as exc:
        parse_reason: str | None = exc.reason
    else:
        parse_reason = None
    try:
        frame = wire.decode_transport_untrusted(data)
    except BadFrame as exc:
        if exc.reason != parse_reason:
            raise AssertionError(f"parse says {parse_reason!r}, decode says {exc.reason!r}") from None
        return
    if parse_reason is not None:
        raise AssertionError(f"parse refused ({parse_reason}) what decode accepted")
    header = frame.header
    if fields != (header.msg_type, header.receiver_index, header.counter) or wire.encode_transport(frame) != data:
        raise AssertionError(f"parse and decode disagree on {data.hex()}")


def check_peek_receiver_index(data: bytes) -> None:
    index = decoded_or_none(wire.peek_receiver_index_untrusted, data)
    field = data[wire.RECEIVER_INDEX_OFFSET : wire.RECEIVER_INDEX_OFFSET + 4]
    if index is not None and index != int.from_bytes(field, "big"):
        raise AssertionError(f"receiver index {index} from {data.hex()}")


def check_ip_destination(data: bytes) -> None:
    either = decoded_or_none(wire.ip_destination_untrusted, data)
    v4 = decoded_or_none(wire.ipv4_destination_untrusted, data)
    if v4 is not None and (not isinstance(v4, ipaddress.IPv4Address) or either != v4):
        raise AssertionError(f"IPv4 destination {v4!r} vs {either!r}")
    if isinstance(either, ipaddress.IPv6Address) and data[0] >> 4 != wire.IPV6_VERSION:
        raise AssertionError(f"IPv6 destination from a version-{data[0] >> 4} packet")


def check_reason_from_wire(data: bytes) -> None:
    """Any integer (negative or past the table too) maps to a ReasonCode with that wire code, or BadFrame."""
    code = int.from_bytes(data[:3], "big", signed=True)
    reason = decoded_or_none(lambda _: wire.reason_from_wire_untrusted(code), data)
    if reason is not None and wire.reason_to_wire(reason) != code:
        raise AssertionError(f"wire code {code} decodes to {reason}, which encodes differently")


CHECKS: tuple[tuple[str, Callable[[bytes], None]], ...] = (
    ("frame", round_trip(wire.decode_untrusted, wire.encode)),
    ("handshake_init", round_trip(wire.decode_handshake_init_untrusted, wire.encode_handshake_init)),
    ("handshake_resp", round_trip(wire.decode_handshake_resp_untrusted, wire.encode_handshake_resp)),
    ("cookie_reply", round_trip(wire.decode_cookie_reply_untrusted, wire.encode_cookie_reply)),
    ("transport", round_trip(wire.decode_transport_untrusted, wire.encode_transport)),
    ("init_payload", round_trip(wire.decode_init_payload_untrusted, wire.encode_init_payload)),
    ("resp_payload", round_trip(wire.decode_resp_payload_untrusted, wire.encode_resp_payload)),
    ("data", round_trip(wire.decode_data_plaintext_untrusted, wire.encode_data_plaintext)),
    ("probe", round_trip(wire.decode_probe_plaintext_untrusted, wire.encode_probe_plaintext)),
    ("probe_ack", round_trip(wire.decode_probe_ack_plaintext_untrusted, wire.encode_probe_ack_plaintext)),
    ("reattach", round_trip(wire.decode_reattach_plaintext_untrusted, wire.encode_reattach_plaintext)),
    ("reattach_ack", round_trip(wire.decode_reattach_ack_plaintext_untrusted, wire.encode_reattach_ack_plaintext)),
    (
        "reattach_reject",
        round_trip(wire.decode_reattach_reject_plaintext_untrusted, wire.encode_reattach_reject_plaintext),
    ),
    ("close", round_trip(wire.decode_close_plaintext_untrusted, wire.encode_close_plaintext)),
    ("path_challenge", round_trip(wire.decode_path_challenge_plaintext_untrusted, wire.encode_path_check_plaintext)),
    ("path_response", round_trip(wire.decode_path_response_plaintext_untrusted, wire.encode_path_check_plaintext)),
    ("plaintext_dispatcher", check_plaintext_dispatcher),
    ("peek_type", check_peek_type),
    ("transport_parsers_agree", check_transport_parsers_agree),
    ("peek_receiver_index", check_peek_receiver_index),
    ("ip_destination", check_ip_destination),
    ("reason_from_wire", check_reason_from_wire),
)


def test_one_input(data: bytes) -> None:
    if not data:
        return
    _name, check = CHECKS[data[0] % len(CHECKS)]
    check(data[1:])


def write_seeds(directory: pathlib.Path) -> int:
    """The seed corpus: every golden frame behind every check's selector byte (libFuzzer keeps the useful ones)."""
    directory.mkdir(parents=True, exist_ok=True)
    frames = [bytes.fromhex(h) for h in json.loads(GOLDEN_FRAMES.read_text())["frames"].values()]
    count = 0
    for selector in range(len(CHECKS)):
        for number, frame in enumerate(frames):
            (directory / f"seed-{selector:02d}-{number:02d}").write_bytes(bytes([selector]) + frame)
            count += 1
    return count


def main() -> None:
    run(test_one_input, write_seeds)


if __name__ == "__main__":
    main()
