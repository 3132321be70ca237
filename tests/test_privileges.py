"""Without CAP_NET_ADMIN (or without /dev/net/tun) `up` and `serve` say so in one line and exit 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from jvpn_trio.commands.process import missing_privilege
from jvpn_trio.keyfile import generate_private_key_text, public_from_private_text, write_private_key

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
