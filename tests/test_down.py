"""``jvpn-trio down`` without root: its config, how it finds the agent, how it tells that it has exited.

The removal itself (real rules, routes, TUN and nft table) is proven in
tests/drivers/test_killswitch.py and, end to end, in
tests/integration/test_leaks_netns.py.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from jvpn_trio.cli import main
from jvpn_trio.commands import down
from jvpn_trio.drivers.leftovers import Leftovers


def test_a_missing_config_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["down", "--config", str(tmp_path / "none.toml")]) == 2
    err = capsys.readouterr().err
    assert err == f"jvpn-trio: {tmp_path / 'none.toml'}: no such file\n"


def test_the_default_config_is_the_system_one() -> None:
    assert down.DEFAULT_CONFIG == Path("/etc/jvpn-trio/client.toml")


async def test_the_agent_is_told_apart_from_a_stale_socket_and_from_none(tmp_path: Path) -> None:
    path = tmp_path / "client.sock"
    assert await down._listening(path) is None
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens: what a killed agent leaves
    assert await down._listening(path) is False
    path.unlink()
    with trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM) as live:
        await live.bind(str(path))
        live.listen(1)
        assert await down._listening(path) is True
    (tmp_path / "file").write_text("")
    with pytest.raises(down.AppError, match="is not a socket"):
        await down._listening(tmp_path / "file")


def test_a_process_has_exited_when_gone_or_a_zombie() -> None:
    assert down._exited(os.getpid()) is False
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # it has exited, not reaped: a zombie
    assert down._exited(child.pid) is True
    child.wait()
    assert down._exited(child.pid) is True


def test_leftovers_are_listed_one_per_line_table_first() -> None:
    found = Leftovers(nft_table=True, rules=("ip -4 rule 20300: not fwmark 0x100/0xf00 lookup 51820",), tun="jvpn0")
    assert found.lines() == [
        "nft table inet jvpn_trio",
        "ip -4 rule 20300: not fwmark 0x100/0xf00 lookup 51820",
        "TUN device jvpn0",
    ]
    assert not found.empty and Leftovers().empty
