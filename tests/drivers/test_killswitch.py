"""The kill switch: the ruleset it renders (pure), and real packets in a namespace of our own (root).

The root tests build one namespace (unique name, always deleted) with a
veth pair inside it: a packet routed out of it goes nowhere, but whether the
kill switch let it out is visible at once, because a drop in an output hook
makes ``sendto()`` fail with EPERM; the table's named counters confirm it.
"""

from __future__ import annotations

import json
import shutil
import sys
from typing import AsyncIterator

import pytest
import trio

from jvpn_trio.config import ClientConfig, load_client_config
from jvpn_trio.drivers import killswitch
from jvpn_trio.drivers.killswitch import KillSwitchError, KillSwitchSpec, install_script, render_table
from jvpn_trio.drivers.leftovers import find_leftovers, remove_leftovers
from tests.netns import requires_root, unique_prefix

GATEWAY = ("192.0.2.1", 51820)
SPEC = KillSwitchSpec(tun_name="jvpn0", gateways=(GATEWAY, ("192.0.2.1", 51821)))


def test_the_table_blocks_by_default_and_names_what_it_lets_out() -> None:
    text = render_table(SPEC)
    assert text.startswith("table inet jvpn_trio {\n")
    output = text.split("chain output {")[1].split("}\n")[0]
    assert "type filter hook output priority filter; policy drop;" in output
    assert 'oif "lo" accept' in output and 'oifname "jvpn0" accept' in output
    # Only marked UDP to the gateway's two ports, not the address or the port alone.
    assert "meta mark & 0x00000f00 == 0x00000100 ip daddr 192.0.2.1 udp dport { 51820, 51821 } accept" in output
    assert "meta nfproto ipv4 udp sport 68 udp dport 67 accept" in output
    assert "meta nfproto ipv6 udp sport 546 udp dport 547 accept" in output
    assert "ip6 hoplimit 255 accept" in output and "ip6 hoplimit 1 accept" in output
    assert "ip protocol igmp ip ttl 1 accept" in output
    assert output.rstrip().endswith('counter name "blocked_output" drop')
    assert "192.168.0.0/16" not in text and "fe80::/10" not in text  # no LAN without allow_lan
    forward = text.split("chain forward {")[1]
    assert "policy drop;" in forward and 'oifname "jvpn0" accept' in forward


def test_allow_lan_opens_private_ranges_but_not_dns_to_them() -> None:
    text = render_table(KillSwitchSpec(tun_name="jvpn0", gateways=(GATEWAY,), allow_lan=True))
    output = text.split("chain output {")[1].split("chain forward")[0]
    lines = [line.strip() for line in output.splitlines()]
    dns4 = next(i for i, line in enumerate(lines) if line.startswith("ip daddr {") and "th dport { 53, 853 }" in line)
    lan4 = next(i for i, line in enumerate(lines) if line.startswith("ip daddr {") and line.endswith("} accept"))
    assert dns4 < lan4  # DNS to the LAN is dropped before the LAN is let out
    for prefix in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16", "224.0.0.0/4"):
        assert prefix in lines[lan4]
    assert "100.64.0.0/10" not in text
    assert any(line.startswith("ip6 daddr { fe80::/10, fc00::/7, ff00::/8 } accept") for line in lines)
    assert 'counter name "blocked_lan_dns" drop' in output
    forward = text.split("chain forward {")[1]
    assert "ip daddr { 10.0.0.0/8" in forward and "th dport" not in forward


def test_an_ipv6_gateway_gets_an_ip6_rule() -> None:
    text = render_table(KillSwitchSpec(tun_name="jvpn0", gateways=(("2001:db8::1", 51820),)))
    assert "ip6 daddr 2001:db8::1 udp dport 51820 accept" in text
    assert " ip daddr 2001" not in text


def test_installing_recreates_the_table_in_one_transaction() -> None:
    script = install_script(SPEC)
    assert script.startswith("table inet jvpn_trio {}\ndelete table inet jvpn_trio\ntable inet jvpn_trio {\n")
    assert killswitch.REMOVE_SCRIPT == "table inet jvpn_trio {}\ndelete table inet jvpn_trio\n"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tun_name": 'x" accept', "gateways": (GATEWAY,)}, "not an interface name"),
        ({"tun_name": "jvpn0", "gateways": ()}, "at least one gateway"),
        ({"tun_name": "jvpn0", "gateways": (("gateway.example", 51820),)}, "does not appear to be an IPv4 or IPv6"),
        ({"tun_name": "jvpn0", "gateways": (("192.0.2.1", 0),)}, "out of range"),
        ({"tun_name": "jvpn0", "gateways": (GATEWAY,), "bypass_mark": 0x1100}, "not within mask"),
    ],
)
def test_a_spec_nft_could_misread_is_refused(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        KillSwitchSpec(**kwargs)  # type: ignore[arg-type]


def _config(tmp_path: object, extra: str = "") -> ClientConfig:
    from pathlib import Path

    directory = Path(str(tmp_path))
    (directory / "client.toml").write_text(
        '[client]\nprivate_key_file = "k"\ngateway_public_key = "x"\ngateway = "192.0.2.1:4000"\n'
        'tun_name = "vpn7"\n' + extra
    )
    return load_client_config(directory / "client.toml")


def test_the_spec_of_a_config_covers_both_gateway_ports(tmp_path: object) -> None:
    spec = KillSwitchSpec.from_config(_config(tmp_path, "allow_lan = true\ncontrol_port_offset = 2\n"))
    assert spec == KillSwitchSpec(tun_name="vpn7", gateways=(("192.0.2.1", 4000), ("192.0.2.1", 4002)), allow_lan=True)


async def test_a_missing_nft_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(KillSwitchError, match=r"^nft not found: .*kill_switch = false\)$"):
        await killswitch.install(SPEC)
    assert await killswitch.is_installed() is False


# -- root: real packets in a namespace of our own ------------------------------------------

#: Sends one UDP datagram per "ADDR:PORT[:MARK]" argument (MARK sets SO_MARK) and prints the outcome of each.
SEND = r"""
import errno, json, socket, sys
out = {}
for arg in sys.argv[1:]:
    host, port, *mark = arg.split(",")
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    if mark:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, int(mark[0], 0))
    try:
        s.sendto(b"x", (host, int(port)))
        out[arg] = "sent"
    except OSError as e:
        out[arg] = errno.errorcode.get(e.errno, str(e.errno))
    s.close()
print(json.dumps(out))
"""

requires_nft = pytest.mark.skipif(shutil.which("nft") is None, reason="needs the nft binary (apt-get install nftables)")


async def _ip(*argv: str) -> None:
    await trio.run_process(["ip", *argv], capture_stdout=True, capture_stderr=True)


@pytest.fixture
async def netns() -> AsyncIterator[str]:
    """A namespace with lo and a LAN interface d0 (192.168.7.2/24, default via 192.168.7.1; a veth, whose peer stays here)."""
    name = unique_prefix() + "-ks"
    await _ip("netns", "add", name)
    try:
        await _ip("-n", name, "link", "set", "lo", "up")
        await _ip("-n", name, "link", "add", "d0", "type", "veth", "peer", "name", "d0peer")
        await _ip("-n", name, "addr", "add", "192.168.7.2/24", "dev", "d0")
        for device in ("d0", "d0peer"):
            await _ip("-n", name, "link", "set", device, "up")
        await _ip("-n", name, "route", "add", "default", "via", "192.168.7.1", "dev", "d0")
        yield name
    finally:
        with trio.CancelScope(shield=True):
            await trio.run_process(["ip", "netns", "del", name], check=False)


async def send(ns: str, *targets: str) -> dict[str, str]:
    result = await trio.run_process(
        ["ip", "netns", "exec", ns, sys.executable, "-c", SEND, *targets], capture_stdout=True
    )
    data: dict[str, str] = json.loads(result.stdout)
    return data


@pytest.mark.root
@requires_root
@requires_nft
async def test_only_marked_udp_to_the_gateway_leaves(netns: str) -> None:
    with trio.fail_after(20):
        spec = KillSwitchSpec(tun_name="jvt0", gateways=(GATEWAY, ("192.0.2.1", 51821)))
        targets = {
            "192.0.2.1,51820,0x5101": "sent",  # a path socket's mark, the data port
            "192.0.2.1,51821,0x5103": "sent",  # the control port
            "192.0.2.1,51820": "EPERM",  # the gateway's port, but not our socket
            "192.0.2.1,51820,0x5201": "EPERM",  # a mark outside the bypass range
            "192.0.2.1,53,0x5101": "EPERM",  # marked, but another port
            "198.51.100.9,51820,0x5101": "EPERM",  # marked, but another host
            "192.168.7.1,9": "EPERM",  # the LAN
            "192.168.7.1,53": "EPERM",  # the LAN's resolver
            "127.0.0.1,9": "sent",  # loopback
            "192.168.7.1,67": "EPERM",  # a DHCP server's port, but not from the client's port
        }
        assert await send(netns) == {}
        assert set((await send(netns, *targets)).values()) == {"sent"}  # before: all open
        await killswitch.install(spec, netns=netns)
        assert await killswitch.is_installed(netns=netns)
        assert await send(netns, *targets) == targets
        counters = await killswitch.read_counters(netns=netns)
        assert counters["blocked_output"] == list(targets.values()).count("EPERM")
        assert counters["blocked_forward"] == counters["blocked_lan_dns"] == 0

        # Installing again replaces the table exactly (fresh counters), in one step.
        await killswitch.install(spec, netns=netns)
        assert (await killswitch.read_counters(netns=netns))["blocked_output"] == 0
        listed = await trio.run_process(["ip", "netns", "exec", netns, "nft", "list", "tables"], capture_stdout=True)
        assert listed.stdout.decode().split().count("jvpn_trio") == 1

        assert await killswitch.remove(netns=netns) is True
        assert await killswitch.remove(netns=netns) is False  # idempotent
        assert set((await send(netns, *targets)).values()) == {"sent"}


@pytest.mark.root
@requires_root
@requires_nft
async def test_allow_lan_lets_the_lan_out_but_not_its_resolver(netns: str) -> None:
    with trio.fail_after(20):
        await killswitch.install(
            KillSwitchSpec(tun_name="jvt0", gateways=(GATEWAY,), allow_lan=True), netns=netns
        )
        outcome = await send(netns, "192.168.7.1,9", "192.168.7.1,53", "198.51.100.9,9", "224.0.0.251,5353")
        assert outcome == {
            "192.168.7.1,9": "sent", "192.168.7.1,53": "EPERM", "198.51.100.9,9": "EPERM", "224.0.0.251,5353": "sent",
        }  # fmt: skip
        counters = await killswitch.read_counters(netns=netns)
        assert counters["blocked_lan_dns"] == 1 and counters["blocked_output"] == 1


@pytest.mark.root
@requires_root
@requires_nft
async def test_a_crash_leaves_the_block_and_a_clean_exit_removes_it(netns: str) -> None:
    lines: list[str] = []
    with trio.fail_after(20):
        with pytest.raises(RuntimeError):
            async with killswitch.open_kill_switch(SPEC, netns=netns, log=lines.append) as switch:
                switch.hold()
                raise RuntimeError("a bug")
        assert await killswitch.is_installed(netns=netns)
        assert lines == ["the kill switch (nft table inet jvpn_trio) stays in place: `jvpn-trio down` removes it"]
        with pytest.raises(RuntimeError):
            async with killswitch.open_kill_switch(SPEC, netns=netns, log=lines.append):
                raise RuntimeError("start-up failed before the agent ran")
        assert not await killswitch.is_installed(netns=netns)
        with trio.CancelScope() as scope:
            async with killswitch.open_kill_switch(SPEC, netns=netns) as switch:
                switch.hold()
                scope.cancel()  # cancelled (a second SIGTERM): a clean way out
                await trio.sleep_forever()
        assert not await killswitch.is_installed(netns=netns)


@pytest.mark.root
@requires_root
@requires_nft
async def test_leftovers_are_found_and_removed_by_name_only(netns: str) -> None:
    ours = [
        ("-4", "rule", "add", "priority", "20300", "not", "fwmark", "0x100/0xf00", "table", "51820", "protocol", "74"),
        ("-6", "rule", "add", "priority", "20300", "not", "fwmark", "0x100/0xf00", "table", "51820", "protocol", "74"),
        ("-4", "rule", "add", "priority", "20100", "fwmark", "0x5101", "table", "51821", "protocol", "74"),
        ("-4", "route", "add", "unreachable", "default", "metric", "4294967295", "table", "51821", "proto", "74"),
        ("-4", "route", "add", "192.0.2.1/32", "via", "192.168.7.1", "dev", "d0", "table", "51821", "proto", "74"),
        ("-6", "route", "add", "unreachable", "default", "metric", "4294967295", "table", "51821", "proto", "74"),
        ("-4", "route", "add", "10.9.0.0/16", "dev", "d0", "proto", "74"),
    ]
    theirs = [
        ("-4", "rule", "add", "priority", "20300", "table", "100"),  # our priority, not our protocol
        ("-4", "route", "add", "10.8.0.0/16", "dev", "d0"),
    ]
    with trio.fail_after(20):
        for argv in ours + theirs:
            await _ip("-n", netns, *argv)
        await _ip("-n", netns, "tuntap", "add", "mode", "tun", "name", "jvt0")
        await _ip("-n", netns, "link", "add", "jvt1", "type", "veth", "peer", "name", "jvt1p")  # not a TUN: not ours
        await killswitch.install(SPEC, netns=netns)
        found = await find_leftovers("jvt0", netns=netns)
        assert found.nft_table and found.tun == "jvt0"
        assert len(found.rules) == 3 and len(found.routes) == 4, found
        assert (await find_leftovers("jvt1", netns=netns)).tun is None
        removed = await remove_leftovers("jvt0", netns=netns)
        assert removed == found
        assert (await find_leftovers("jvt0", netns=netns)).empty
        assert (await remove_leftovers("jvt0", netns=netns)).empty  # idempotent
        rules = await trio.run_process(["ip", "-n", netns, "rule"], capture_stdout=True)
        assert "20300:\tfrom all lookup 100" in rules.stdout.decode()
        routes = await trio.run_process(["ip", "-n", netns, "route"], capture_stdout=True)
        assert "10.8.0.0/16 dev d0" in routes.stdout.decode() and "10.9.0.0/16" not in routes.stdout.decode()
