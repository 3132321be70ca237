"""Without CAP_NET_ADMIN (or without /dev/net/tun) `up` and `serve` say so in one line and exit 2."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from jvpn_trio.commands.process import NO_CAP_NET_ADMIN, missing_privilege
from jvpn_trio.drivers.dns import DnsRequest, Method, resolved_plan, revert_link_call, unprivileged_hint
from jvpn_trio.keyfile import generate_private_key_text, public_from_private_text, write_private_key

ROOT = Path(__file__).resolve().parents[1]
MESSAGE = "jvpn-trio: needs root or CAP_NET_ADMIN to create TUN devices and routes (try sudo)"
# prctl(PR_CAPBSET_DROP=24, CAP_NET_ADMIN=12) then exec: even root keeps only its bounding set.
DROP_AND_EXEC = (
    "import ctypes, os, sys; "
    "assert ctypes.CDLL(None, use_errno=True).prctl(24, 12, 0, 0, 0) == 0; "
    "os.execv(sys.executable, [sys.executable, '-m', 'jvpn_trio', *sys.argv[1:]])"
)


def configs(tmp_path: Path) -> tuple[Path, Path]:
    key, peer = generate_private_key_text(os.urandom), generate_private_key_text(os.urandom)
    write_private_key(tmp_path / "k", key)
    (tmp_path / "client.toml").write_text(
        f'[client]\nprivate_key_file = "k"\ngateway_public_key = "{public_from_private_text(peer)}"\n'
        'gateway = "192.0.2.1:51820"\n[[path]]\ninterface = "lo"\nkind = "ethernet"\n'
    )
    (tmp_path / "gateway.toml").write_text(
        f'[gateway]\nprivate_key_file = "k"\n[[peer]]\npublic_key = "{public_from_private_text(peer)}"\n'
    )
    return tmp_path / "client.toml", tmp_path / "gateway.toml"


@pytest.mark.parametrize("command", ["up", "serve"])
def test_without_cap_net_admin_one_line_and_exit_2(tmp_path: Path, command: str) -> None:
    client, gateway = configs(tmp_path)
    config = client if command == "up" else gateway
    if os.geteuid() == 0:
        argv = [sys.executable, "-c", DROP_AND_EXEC, command, "--config", str(config)]
    else:
        argv = [sys.executable, "-m", "jvpn_trio", command, "--config", str(config)]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [MESSAGE]
    assert "Traceback" not in result.stderr


def test_capability_decides_not_the_uid(tmp_path: Path) -> None:
    status = tmp_path / "status"
    tun = tmp_path / "tun"
    tun.write_text("")
    status.write_text("Name:\tx\nCapEff:\t0000000000001000\n")  # only CAP_NET_ADMIN (bit 12)
    assert missing_privilege(str(status), str(tun)) is None
    status.write_text("Name:\tx\nCapEff:\t000001ffffffefff\n")  # everything but CAP_NET_ADMIN
    assert missing_privilege(str(status), str(tun)) == MESSAGE.removeprefix("jvpn-trio: ")
    assert "is missing" in str(missing_privilege(str(status), str(tmp_path / "absent")))


def test_with_cap_net_admin_but_a_closed_tun_device_says_so(tmp_path: Path) -> None:
    """A non-root agent (the units' User=) needs /dev/net/tun open to it: udev's 0666, not a bare 0600 node."""
    status, tun = tmp_path / "status", tmp_path / "tun"
    tun.write_text("")
    tun.chmod(0o600)
    status.write_text("Name:\tx\nCapEff:\t0000000000001000\n")
    problem = missing_privilege(str(status), str(tun), can_open=lambda _path: False)
    assert problem is not None
    assert problem.startswith(f"has CAP_NET_ADMIN but cannot open {tun} as uid {os.geteuid()} (mode 0600): ")
    assert "0666" in problem and "\n" not in problem
    assert missing_privilege(str(status), str(tun), can_open=lambda _path: True) is None
    status.write_text("Name:\tx\nCapEff:\t0000000000000000\n")  # no capability: that is said first
    assert missing_privilege(str(status), str(tun), can_open=lambda _path: False) == NO_CAP_NET_ADMIN


def test_dns_errors_say_why_a_non_root_agent_is_refused() -> None:
    assert unprivileged_hint(Method.FILE, euid=0) == "" and unprivileged_hint(Method.RESOLVED, euid=0) == ""
    assert unprivileged_hint(Method.FILE, euid=998) == (
        " (uid 998 is not root: the file DNS method needs root; docs/service.md, Privileges)"
    )
    assert "the resolvconf DNS method needs root" in unprivileged_hint(Method.RESOLVCONF, euid=998)
    assert "examples/systemd/jvpn-trio-resolved.rules" in unprivileged_hint(Method.RESOLVED, euid=998)
    assert (ROOT / "examples" / "systemd" / "jvpn-trio-resolved.rules").exists()


def test_the_polkit_rule_allows_exactly_the_resolved_calls_the_agent_makes() -> None:
    """SetLinkDNS, SetLinkDomains, SetLinkDefaultRoute, RevertLink: their polkit actions, for the units' user."""
    text = (ROOT / "examples" / "systemd" / "jvpn-trio-resolved.rules").read_text()
    actions = set(re.findall(r'"(org\.freedesktop\.resolve1\.[a-z-]+)"', text))
    assert actions == {f"org.freedesktop.resolve1.{a}" for a in ("set-dns-servers", "set-domains", "set-default-route", "revert")}
    members = {call.member for call in resolved_plan(
        DnsRequest(tun_name="t0", servers=("10.0.0.1",), search=("x",), full_tunnel=True), ifindex=3
    ).calls()} | {revert_link_call(3).member}  # fmt: skip
    assert members == {"SetLinkDNS", "SetLinkDomains", "SetLinkDefaultRoute", "RevertLink"}
    user = re.search(r'subject\.user === "([^"]+)"', text)
    assert user is not None and user.group(1) == "jvpn-trio"
    sysusers = (ROOT / "examples" / "systemd" / "jvpn-trio.sysusers.conf").read_text()
    assert re.search(r"^u jvpn-trio ", sysusers, re.MULTILINE)
