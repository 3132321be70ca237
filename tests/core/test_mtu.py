"""Tunnel MTU and MSS arithmetic (core/mtu.py): the overhead comes from the wire format.

Determinism: pure functions of their arguments; no clock, no randomness beyond
hypothesis's own (seeded by it and replayed on failure).
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from jvpn_trio import config
from jvpn_trio.core import mtu, wire
from jvpn_trio.core.keyring import DATA_LANE, Keypair
from jvpn_trio.core.mtu import Family, client_tun_mtu, tcp_mss, tunnel_mtu


def test_overhead_is_outer_ip_plus_udp_plus_the_transport_framing() -> None:
    # 16-byte transport header + 16-byte tag (docs/wire-format.md), UDP 8, IPv4 20 / IPv6 40.
    assert wire.TRANSPORT_OVERHEAD == wire.TRANSPORT_HEADER_LEN + wire.TAG_LEN == 32
    assert mtu.OVERHEAD == {Family.IPV4: 60, Family.IPV6: 80}
    assert mtu.overhead(Family.IPV4) == 20 + 8 + wire.TRANSPORT_OVERHEAD


def test_a_full_data_frame_fills_the_path_exactly() -> None:
    """A sealed DATA datagram carrying a tunnel_mtu-byte packet makes an outer packet of exactly the path MTU."""
    keypair = Keypair(send_key=bytes(32), recv_key=bytes(32), local_index=1, remote_index=2, is_initiator=True, created_at=0.0)
    for outer in Family:
        inner = tunnel_mtu([1500], outer)
        header = wire.pack_transport_header(wire.MessageType.DATA, keypair.remote_index, 0)
        datagram = header + keypair.seal(0, bytes(inner), header, lane=DATA_LANE)
        assert len(datagram) == inner + wire.TRANSPORT_OVERHEAD
        assert mtu.IP_HEADER_LEN[outer] + mtu.UDP_HEADER_LEN + len(datagram) == 1500


def test_the_config_bounds_and_default_are_the_cores() -> None:
    """config.py's numbers must not drift from the derivation (docs/mtu.md)."""
    assert config.MIN_MTU == mtu.MIN_TUNNEL_MTU
    assert config.MIN_MTU6 == mtu.MIN_TUNNEL_MTU6
    # The gateway's default fits an Ethernet path with the larger (IPv6) outer overhead.
    assert config.DEFAULT_MTU == tunnel_mtu([mtu.ETHERNET_MTU], Family.IPV6) == 1420


@pytest.mark.parametrize(
    ("paths", "outer", "expected"),
    [
        ([1500], Family.IPV4, 1440),
        ([1500], Family.IPV6, 1420),
        ([1500, 1280], Family.IPV4, 1220),  # the smallest path decides, active or not
        ([1500, 1280], Family.IPV6, 1200),
        ([9000, 1500], Family.IPV4, 1440),
        ([65536], Family.IPV4, 65476),  # loopback
        ([100_000], Family.IPV4, mtu.MAX_TUNNEL_MTU),  # never more than a DATA frame carries
        ([1492], Family.IPV4, 1432),  # PPPoE
        ([], Family.IPV4, 1440),  # no path yet: Ethernet is assumed
        ([], Family.IPV6, 1420),
        ([600], Family.IPV4, mtu.MIN_TUNNEL_MTU),  # never below what every IPv4 host accepts
        ([1200, 1500], Family.IPV6, 1420),  # a link below 1280 cannot carry IPv6 outer: left out
        ([60, 1500], Family.IPV4, 1440),  # nor IPv4 below 68
    ],
)
def test_tunnel_mtu(paths: list[int], outer: Family, expected: int) -> None:
    assert tunnel_mtu(paths, outer) == expected


def test_a_tunnel_carrying_ipv6_never_goes_below_1280() -> None:
    assert tunnel_mtu([1280], Family.IPV4) == 1220
    assert tunnel_mtu([1280], Family.IPV4, inner_ipv6=True) == mtu.MIN_TUNNEL_MTU6 == 1280


def test_the_family_may_be_given_as_an_ip_version() -> None:
    assert tunnel_mtu([1500], 6) == tunnel_mtu([1500], Family.IPV6)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        tunnel_mtu([1500], 5)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [0, -1, True, 1500.0, "1500", None])
def test_path_mtus_must_be_positive_integers(bad: Any) -> None:
    with pytest.raises(ValueError, match="path MTU"):
        tunnel_mtu([1500, bad], Family.IPV4)


def test_the_configured_mtu_wins_over_the_derived_one() -> None:
    assert client_tun_mtu(1300, [1500], Family.IPV4) == 1300
    assert client_tun_mtu(None, [1500, 1280], Family.IPV4) == 1220
    assert client_tun_mtu(None, [1280], Family.IPV6, inner_ipv6=True) == 1280
    with pytest.raises(ValueError):
        client_tun_mtu(0, [1500], Family.IPV4)


def test_mss_is_the_mtu_less_inner_ip_and_tcp_headers() -> None:
    assert tcp_mss(1420, Family.IPV4) == 1380
    assert tcp_mss(1420, Family.IPV6) == 1360
    assert tcp_mss(1500, Family.IPV4) == 1460  # Ethernet's familiar value
    assert tcp_mss(576, Family.IPV4) == 536  # RFC 879's default MSS
    assert tcp_mss(1280, Family.IPV6) == 1220


@pytest.mark.parametrize(("value", "family"), [(1279, Family.IPV6), (67, Family.IPV4), (65504, Family.IPV4), (0, Family.IPV4)])
def test_mss_refuses_an_mtu_that_cannot_carry_the_family(value: int, family: Family) -> None:
    with pytest.raises(ValueError):
        tcp_mss(value, family)


@given(
    paths=st.lists(st.integers(min_value=1, max_value=70_000), max_size=6),
    outer=st.sampled_from(list(Family)),
    inner_ipv6=st.booleans(),
)
def test_the_result_is_bounded_and_fits_every_usable_path(paths: list[int], outer: Family, inner_ipv6: bool) -> None:
    result = tunnel_mtu(paths, outer, inner_ipv6=inner_ipv6)
    lower = mtu.MIN_TUNNEL_MTU6 if inner_ipv6 else mtu.MIN_TUNNEL_MTU
    assert lower <= result <= mtu.MAX_TUNNEL_MTU
    usable = [p for p in paths if p >= mtu.MIN_LINK_MTU[outer]]
    for path in usable:
        # Either a full packet fits this path, or the floor forced the result above it.
        assert result + mtu.OVERHEAD[outer] <= path or result == lower
    # Adding a path never raises the MTU; removing the smallest never lowers it.
    assert tunnel_mtu([*paths, 1500], outer, inner_ipv6=inner_ipv6) <= max(result, tunnel_mtu([1500], outer, inner_ipv6=inner_ipv6))
    for family in Family:
        if result >= mtu.MIN_LINK_MTU[family]:
            assert tcp_mss(result, family) + mtu.IP_HEADER_LEN[family] + mtu.TCP_HEADER_LEN == result
