"""Fuzzing the lab's probe decoder and the terminal key decoder (issue 15, "Inputs that never crash").

Properties, the CI twin of fuzz/fuzz_traffic.py:

* ``decode_probe_untrusted`` returns or raises BadProbe, on arbitrary datagrams, on datagrams
  behind the probe magic and on mutated probes; a probe that decodes is within the bounds the
  sink relies on, its header encodes back to the same bytes, and every valid probe round-trips;
* ``decode_keys`` is total: it raises nothing, yields at most one key per byte, and every key is
  a Command or a digit 1-9.

Determinism: hypothesis draws the inputs (its database replays failures); no sockets, no clock.
"""

from __future__ import annotations

import math

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jvpn_trio.lab.traffic import (
    MAX_PROBE_HZ,
    MAX_PROBES,
    PROBE_HEADER,
    PROBE_MAGIC,
    BadProbe,
    Probe,
    decode_probe_untrusted,
    encode_probe,
)
from jvpn_trio.ui.keys import Command, decode_keys

FUZZ = settings(deadline=None, max_examples=300, suppress_health_check=[HealthCheck.too_slow])

finite = st.floats(allow_nan=False, allow_infinity=False)


@st.composite
def valid_probes(draw: st.DrawFn) -> Probe:
    count = draw(st.integers(1, MAX_PROBES))
    return Probe(
        stream_id=draw(st.integers(0, 2**32 - 1)),
        seq=draw(st.integers(0, count - 1)),
        count=count,
        hz=draw(st.floats(min_value=0.0, max_value=MAX_PROBE_HZ, exclude_min=True)),
        start=draw(finite),
        sent=draw(finite),
    )


@st.composite
def mutated_probes(draw: st.DrawFn) -> bytes:
    raw = bytearray(encode_probe(draw(valid_probes()), size=draw(st.integers(0, 80))))
    for _ in range(draw(st.integers(1, 3))):
        raw[draw(st.integers(0, len(raw) - 1))] = draw(st.integers(0, 255))
    return bytes(raw[: draw(st.integers(0, len(raw)))]) if draw(st.booleans()) else bytes(raw)


datagrams = st.one_of(
    st.binary(max_size=80),
    st.binary(min_size=PROBE_HEADER.size - len(PROBE_MAGIC), max_size=80).map(lambda tail: PROBE_MAGIC + tail),
    mutated_probes(),
)


@FUZZ
@given(datagrams)
def test_datagrams_decode_or_raise_bad_probe(data: bytes) -> None:
    try:
        probe = decode_probe_untrusted(data)
    except BadProbe as exc:
        assert str(exc)
        return
    assert 0 < probe.count <= MAX_PROBES and 0 <= probe.seq < probe.count and 0 < probe.hz <= MAX_PROBE_HZ
    assert math.isfinite(probe.start) and math.isfinite(probe.sent)
    encoded = encode_probe(probe, size=len(data))
    assert encoded[: PROBE_HEADER.size] == data[: PROBE_HEADER.size]
    assert decode_probe_untrusted(encoded) == probe


@FUZZ
@given(probe=valid_probes(), size=st.integers(0, 200))
def test_valid_probes_round_trip(probe: Probe, size: int) -> None:
    assert decode_probe_untrusted(encode_probe(probe, size=size)) == probe


keystrokes = st.one_of(
    st.binary(max_size=64),
    st.lists(st.sampled_from([b"\x1b", b"[", b"O", b"A", b"B", b"1", b"~", b";", b"q", b"\r", b"9", b"\x7f"]), max_size=20).map(
        b"".join
    ),
)


@FUZZ
@given(keystrokes)
def test_keys_decode_without_raising(data: bytes) -> None:
    keys = decode_keys(data)
    assert len(keys) <= len(data)
    assert all(isinstance(k, Command) or (type(k) is int and 1 <= k <= 9) for k in keys)
