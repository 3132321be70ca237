"""atheris target: the byte decoders outside the VPN protocol (issue 15, "Inputs that never crash").

The first byte of an input picks one, the rest is its input:

* ``lab.traffic.decode_probe_untrusted``, the lab's UDP probe datagrams (anyone on the path can
  send them): returns, or raises BadProbe; anything else is a crash.  A probe that decodes has
  the bounds the sink relies on (``0 < count <= MAX_PROBES``, ``seq < count``, finite timings,
  ``0 < hz <= MAX_PROBE_HZ``), its header encodes back to the same bytes and decodes again to
  the same probe.
* ``ui.keys.decode_keys``, the bytes read from the terminal (a local user's keys, or whatever
  is pasted into it): pure and total, it raises nothing and yields at most one key per byte,
  each a Command or a digit 1-9.

The hypothesis twin that runs in CI is tests/properties/test_traffic_fuzz.py.  atheris is not
a dependency of the project; fuzz/README.md has the commands.
"""

from __future__ import annotations

import math
import pathlib

import atheris  # type: ignore[import-untyped,import-not-found,unused-ignore]
import trio  # noqa: F401  (imported before instrumenting: the decoders never call it)
from fuzzing import run

with atheris.instrument_imports():
    from jvpn_trio.lab.traffic import (
        MAX_PROBE_HZ,
        MAX_PROBES,
        PROBE_HEADER,
        BadProbe,
        Probe,
        decode_probe_untrusted,
        encode_probe,
    )
    from jvpn_trio.ui.keys import Command, decode_keys

#: A digit key is a row of the path picker: 1..9.
DIGIT_KEYS = range(1, 10)


def check_probe(data: bytes) -> None:
    try:
        probe = decode_probe_untrusted(data)
    except BadProbe as exc:
        if not str(exc):
            raise AssertionError("BadProbe without a message") from None
        return
    if not (0 < probe.count <= MAX_PROBES and 0 <= probe.seq < probe.count and 0 < probe.hz <= MAX_PROBE_HZ):
        raise AssertionError(f"decoded a probe out of bounds: {probe!r}")
    if not (math.isfinite(probe.start) and math.isfinite(probe.sent)):
        raise AssertionError(f"decoded a probe with non-finite timings: {probe!r}")
    encoded = encode_probe(probe, size=len(data))
    if encoded[: PROBE_HEADER.size] != data[: PROBE_HEADER.size] or decode_probe_untrusted(encoded) != probe:
        raise AssertionError(f"probe header not canonical: {data[: PROBE_HEADER.size].hex()}")


def check_keys(data: bytes) -> None:
    keys = decode_keys(data)
    if len(keys) > len(data):
        raise AssertionError(f"{len(keys)} keys from {len(data)} bytes")
    for key in keys:
        if not isinstance(key, Command) and not (type(key) is int and key in DIGIT_KEYS):
            raise AssertionError(f"decoded an impossible key: {key!r}")


CHECKS = (check_probe, check_keys)


def test_one_input(data: bytes) -> None:
    if not data:
        return
    CHECKS[data[0] % len(CHECKS)](data[1:])


def write_seeds(directory: pathlib.Path) -> int:
    """The seed corpus: well-formed probes, and key presses with the escape sequences decode_keys knows."""
    directory.mkdir(parents=True, exist_ok=True)
    probes = [
        encode_probe(Probe(stream_id=1, seq=0, count=100, hz=50.0, start=10.0, sent=10.0)),
        encode_probe(Probe(stream_id=2**32 - 1, seq=9, count=10, hz=MAX_PROBE_HZ, start=0.0, sent=-1.5), size=0),
    ]
    keys = [b"qpus?\r\n19", b"\x1b[A\x1b[B\x1bOA\x1b[1;5C\x1b", b"kj\x1b[15~e i h"]
    seeds = [bytes([0]) + probe for probe in probes] + [bytes([1]) + key for key in keys]
    for number, seed in enumerate(seeds):
        (directory / f"seed-{number}").write_bytes(seed)
    return len(seeds)


def main() -> None:
    run(test_one_input, write_seeds)


if __name__ == "__main__":
    main()
