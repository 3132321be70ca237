"""The port helpers: shedding a receive backlog keeps every control frame and the newest DATA."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from jvpn_trio.core import wire
from jvpn_trio.drivers.ports import Address, shed_oldest_data

PEER: Address = ("192.0.2.1", 51820)
STRANGER: Address = ("198.51.100.9", 51820)
#: Type bytes a receiver may meet: DATA, DATA_PARTIAL, control types, junk; plus short datagrams.
KINDS = st.sampled_from([wire.MessageType.DATA, wire.MessageType.DATA_PARTIAL, wire.MessageType.PROBE_ACK,
                         wire.MessageType.REATTACH_ACK, wire.MessageType.CLOSE, 0xEE, None])


def datagram(kind: int | None, n: int, version: int = wire.PROTOCOL_VERSION) -> bytes:
    return b"" if kind is None else bytes([version, kind]) + n.to_bytes(4, "big")


def is_data(item: tuple[bytes, Address]) -> bool:
    """What DATA looks like, spelt out here rather than taken from the code under test."""
    data = item[0]
    return len(data) >= 2 and data[0] == wire.PROTOCOL_VERSION and data[1] in (4, 13)


def is_peer(addr: Address) -> bool:
    return addr == PEER


@given(st.lists(st.tuples(KINDS, st.booleans(), st.booleans()), max_size=60), st.integers(min_value=0, max_value=40))
def test_strangers_and_the_oldest_data_go_and_nothing_else(
    rows: list[tuple[int | None, bool, bool]], keep: int
) -> None:
    batch = [(datagram(kind, n, wire.PROTOCOL_VERSION if current else wire.PROTOCOL_VERSION - 1),
              PEER if peer else STRANGER) for n, (kind, peer, current) in enumerate(rows)]  # fmt: skip
    kept, shed, strays = shed_oldest_data(batch, keep, is_peer)
    ours = [item for item in batch if item[1] == PEER]
    data = [item for item in ours if is_data(item)]
    assert strays == len(batch) - len(ours)
    assert shed == max(0, len(data) - keep)
    assert [item for item in kept if is_data(item)] == data[shed:]  # the newest DATA, in order
    assert [item for item in kept if not is_data(item)] == [item for item in ours if not is_data(item)]
    assert [item for item in ours if item in kept] == kept  # nothing reordered


def test_junk_from_elsewhere_cannot_push_the_peers_data_out() -> None:
    genuine = [(datagram(wire.MessageType.DATA, n), PEER) for n in range(600)]
    junk = [(datagram(wire.MessageType.DATA, n), STRANGER) for n in range(1_100)]
    kept, shed, strays = shed_oldest_data([*genuine, *junk], 1_024, is_peer)
    assert (kept, shed, strays) == (genuine, 0, 1_100)


def test_a_flood_behind_which_a_close_waits() -> None:
    flood = [(datagram(wire.MessageType.DATA, n), PEER) for n in range(5_000)]
    close = (datagram(wire.MessageType.CLOSE, 5_000), PEER)
    kept, shed, strays = shed_oldest_data([*flood, close], 1_024, is_peer)
    assert (shed, strays) == (5_000 - 1_024, 0) and kept == [*flood[-1_024:], close]
