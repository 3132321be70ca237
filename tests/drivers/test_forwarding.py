"""The gateway's nftables table (drivers/forwarding.py): rendering, and installing in a namespace.

The rendering tests are pure.  The root tests install the table into a lab's gateway
namespace (``jvpn_trio.lab.netns``, a fresh ``jvt`` prefix, deleted afterwards), never
into the machine's own; the clamp's effect on real TCP is tests/integration/test_mtu_netns.py's.

Determinism: no sleeps; every root test runs under ``trio.fail_after``; the fake ``nft``
records calls instead of timing anything.
"""

from __future__ import annotations

import json
from typing import Any, AsyncIterator

import pytest
import trio

from jvpn_trio.core.mtu import Family, tcp_mss
from jvpn_trio.drivers import forwarding
from jvpn_trio.drivers.forwarding import (
    CLAMP_COUNTERS,
    TABLE,
    ForwardingError,
    GatewayTable,
    open_gateway_table,
    read_counters,
    remove_gateway_table,
    render,
)
from jvpn_trio.lab.netns import Lab, LabPath, LabSpec, open_lab
from tests.netns import requires_lab, unique_prefix

# -- rendering (pure) --------------------------------------------------------------------------


def test_render_clamps_both_directions_of_both_families_to_the_tunnel_mss() -> None:
    script = render(GatewayTable(tun_name="jvgw0", mtu=1420))
    rules = [line.strip() for line in script.splitlines() if "maxseg" in line]
    assert len(rules) == 4
    for family, mss, proto in ((Family.IPV4, 1380, "ipv4"), (Family.IPV6, 1360, "ipv6")):
        assert tcp_mss(1420, family) == mss
        for direction, match in (("from_tunnel", "iifname"), ("to_tunnel", "oifname")):
            counter = CLAMP_COUNTERS[(family, direction)]
            assert (
                f'meta nfproto {proto} {match} "jvgw0" tcp flags & (syn | rst) == syn'
                f' tcp option maxseg size > {mss} counter name "{counter}" tcp option maxseg size set {mss}'
            ) in rules
            assert f"counter {counter} {{}}" in script


def test_render_replaces_the_table_in_one_transaction() -> None:
    lines = render(GatewayTable(tun_name="jvgw0", mtu=1420)).splitlines()
    # Declare (so the delete cannot fail on a clean machine), delete, declare with content.
    assert lines[:3] == [f"table inet {TABLE} {{}}", f"delete table inet {TABLE}", f"table inet {TABLE} {{"]
    assert "    type filter hook forward priority mangle; policy accept;" in lines
    assert sum(line.startswith("table ") for line in lines) == 2  # nothing outside our table


def test_render_leaves_ipv6_out_below_1280() -> None:
    script = render(GatewayTable(tun_name="jvgw0", mtu=1200))
    assert "ipv6" not in script and "mss6" not in script
    assert "maxseg size set 1160" in script


@pytest.mark.parametrize(
    ("field", "value"),
    [("tun_name", ""), ("tun_name", "a" * 16), ("tun_name", 'x" accept'), ("tun_name", "a b"),
     ("mtu", 67), ("mtu", 65504), ("mtu", True), ("mtu", "1420")],
)  # fmt: skip
def test_gateway_table_refuses_what_nft_would_misparse(field: str, value: Any) -> None:
    fields: dict[str, Any] = {"tun_name": "jvgw0", "mtu": 1420, field: value}
    with pytest.raises(ValueError):
        GatewayTable(**fields)


# -- the context manager with a fake nft --------------------------------------------------------


@pytest.fixture
def fake_nft(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record each nft script instead of running it."""
    calls: list[str] = []

    async def nft(netns: str | None, args: Any, *, stdin: bytes = b"") -> bytes:
        await trio.lowlevel.checkpoint()
        calls.append("remove" if b"delete" in stdin and b"chain" not in stdin else "install")
        return b""

    monkeypatch.setattr(forwarding, "_nft", nft)
    return calls


async def test_the_table_is_removed_when_the_block_is_cancelled(fake_nft: list[str]) -> None:
    with trio.CancelScope() as scope:
        async with open_gateway_table(GatewayTable(tun_name="jvgw0", mtu=1420)):
            scope.cancel()
            await trio.sleep_forever()
    assert scope.cancelled_caught
    assert fake_nft == ["install", "remove"]


async def test_the_table_is_removed_when_the_block_fails(fake_nft: list[str]) -> None:
    with pytest.raises(KeyError):
        async with open_gateway_table(GatewayTable(tun_name="jvgw0", mtu=1420)):
            raise KeyError("boom")
    assert fake_nft == ["install", "remove"]


async def test_a_failed_removal_is_raised_on_clean_exit_only(monkeypatch: pytest.MonkeyPatch) -> None:
    async def nft(netns: str | None, args: Any, *, stdin: bytes = b"") -> bytes:
        await trio.lowlevel.checkpoint()
        if b"chain" not in stdin:
            raise ForwardingError("nft -f -: exit 1: refused")
        return b""

    monkeypatch.setattr(forwarding, "_nft", nft)
    with pytest.raises(ForwardingError, match="refused"):
        async with open_gateway_table(GatewayTable(tun_name="jvgw0", mtu=1420)):
            pass
    with pytest.raises(KeyError):  # the block's own error is not replaced
        async with open_gateway_table(GatewayTable(tun_name="jvgw0", mtu=1420)):
            raise KeyError("boom")


# -- installing, as root, in a lab's gateway namespace -----------------------------------------


@pytest.fixture
async def one_path_lab() -> AsyncIterator[Lab]:
    spec = LabSpec(prefix=unique_prefix(), paths=(LabPath(name="eth0", kind="ethernet", metric=10, index=1),))
    async with open_lab(spec) as built:
        yield built


async def _table(lab: Lab) -> dict[str, Any] | None:
    """Our table in the gateway namespace as nft's JSON, or None if it does not exist."""
    result = await lab.run(lab.gateway_ns, "nft", "-j", "list", "table", "inet", TABLE, check=False)
    if result.returncode != 0:
        return None
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def _rule_count(listing: dict[str, Any]) -> int:
    return sum(1 for item in listing["nftables"] if "rule" in item)


@requires_lab
async def test_the_table_lives_exactly_as_long_as_its_block(one_path_lab: Lab) -> None:
    lab = one_path_lab
    with trio.fail_after(30):
        assert await _table(lab) is None
        async with open_gateway_table(GatewayTable(tun_name="jvgw0", mtu=1420), netns=lab.gateway_ns):
            listing = await _table(lab)
            assert listing is not None and _rule_count(listing) == 4
            counters = await read_counters(netns=lab.gateway_ns)
            assert set(counters.packets) == set(CLAMP_COUNTERS) and counters.total() == 0
        assert await _table(lab) is None
        await remove_gateway_table(netns=lab.gateway_ns)  # idempotent: already gone is fine
        # The table exists only in the namespace it was put in.
        assert (await lab.run(lab.client_ns, "nft", "list", "tables")).stdout.count(TABLE.encode()) == 0


@requires_lab
async def test_a_leftover_table_is_replaced_atomically(one_path_lab: Lab) -> None:
    lab = one_path_lab
    with trio.fail_after(30):
        stale = f"table inet {TABLE} {{\n  chain stale {{ }}\n  chain forward {{ type filter hook forward priority 0; }}\n}}\n"
        await lab.run(lab.gateway_ns, "nft", "-f", "-", stdin=stale.encode())
        async with open_gateway_table(GatewayTable(tun_name="jvgw0", mtu=1300), netns=lab.gateway_ns):
            listing = await _table(lab)
            assert listing is not None
            chains = [item["chain"]["name"] for item in listing["nftables"] if "chain" in item]
            assert chains == ["forward"] and _rule_count(listing) == 4
            text = (await lab.run(lab.gateway_ns, "nft", "list", "table", "inet", TABLE)).stdout.decode()
            assert "maxseg size set 1260" in text and "maxseg size set 1240" in text
        assert await _table(lab) is None


@requires_lab
async def test_a_refused_table_changes_nothing(one_path_lab: Lab, monkeypatch: pytest.MonkeyPatch) -> None:
    lab = one_path_lab
    with trio.fail_after(30):
        monkeypatch.setattr(forwarding, "render", lambda table: f"table inet {TABLE} {{ chain forward {{ nonsense; }} }}\n")
        with pytest.raises(ForwardingError, match="nft -f -: exit 1"):
            async with open_gateway_table(GatewayTable(tun_name="jvgw0", mtu=1420), netns=lab.gateway_ns):
                pytest.fail("the block must not run")
        assert await _table(lab) is None
        with pytest.raises(ForwardingError):
            await read_counters(netns=lab.gateway_ns)
