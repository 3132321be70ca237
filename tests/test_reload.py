"""Peer reload without root: the reloader against a real gateway runtime, its refusals, the CLI.

The runtime's side (what ends, what is untouched, a removed key refused) is proven with live
sessions in tests/drivers/test_runtime_memory.py; the admission table's in
tests/core/test_admission.py; real processes in tests/integration/test_gateway_peers_netns.py.
"""

from __future__ import annotations

import ipaddress
import random
from pathlib import Path

import pytest
import trio

from jvpn_trio.cli import main
from jvpn_trio.commands.serve import PeerReloader, describe_reload, settings_needing_restart
from jvpn_trio.config import load_gateway_config
from jvpn_trio.core.noise import generate_static
from jvpn_trio.core.policy import Policy
from jvpn_trio.drivers import control
from jvpn_trio.drivers.gateway import GatewayRuntime
from jvpn_trio.drivers.store_memory import MemoryOwnershipStore
from jvpn_trio.keyfile import generate_private_key_text, public_from_private_text

RNG = random.Random(3)


def key() -> str:
    return public_from_private_text(generate_private_key_text(lambda n: bytes(RNG.getrandbits(8) for _ in range(n))))


ALICE, BOB, CAROL = key(), key(), key()


def write_config(directory: Path, *, peers: dict[str, str], extra: str = "") -> Path:
    """A gateway config with a peers.d holding one file per peer (name -> public key)."""
    peers_dir = directory / "peers.d"
    peers_dir.mkdir(exist_ok=True)
    for old in peers_dir.iterdir():
        old.unlink()
    for name, public in peers.items():
        (peers_dir / f"{name}.toml").write_text(f'public_key = "{public}"\n')
    path = directory / "gateway.toml"
    path.write_text(f'[gateway]\nprivate_key_file = "gateway.key"\npeers_dir = "peers.d"\n{extra}')
    return path


def runtime_for(path: Path) -> tuple[GatewayRuntime, PeerReloader]:
    from jvpn_trio.commands.serve import gateway_peers

    config = load_gateway_config(path)
    runtime = GatewayRuntime(
        policy=Policy(),
        static=generate_static(lambda n: bytes(RNG.getrandbits(8) for _ in range(n))),
        peers=gateway_peers(config.peers),
        tunnel=config.tunnel_address,
        store=MemoryOwnershipStore(),
        node_id=config.node_id,
        emit=lambda _event: None,
    )
    return runtime, PeerReloader(runtime, config, path)


async def test_a_reload_reads_the_directory_again_and_says_what_changed(tmp_path: Path) -> None:
    path = write_config(tmp_path, peers={"alice": ALICE, "bob": BOB})
    runtime, reloader = runtime_for(path)
    write_config(tmp_path, peers={"alice": ALICE, "carol": CAROL})
    result = await reloader.reload()
    assert result == {
        "added": ["carol"], "removed": ["bob"], "readdressed": [], "renamed": [], "unchanged": 1,
        "sessions_closed": 0, "restart_needed": [],
    }  # fmt: skip
    assert describe_reload(result) == (
        "peers reloaded: added carol; removed bob; 1 unchanged; 0 session(s) closed (PEER_REMOVED)"
    )
    assert sorted(p.name for p in runtime._peers.values()) == ["alice", "carol"]


@pytest.mark.parametrize(
    ("peers", "problem"),
    [
        ({"alice": ALICE, "alice2": ALICE}, "the public key of peer 'alice2' is also peer 'alice''s"),
        ({"alice": "not base64 at all"}, "public key"),
        ({}, "at least one [[peer]] or a file in"),
    ],
)
async def test_a_config_that_does_not_load_changes_nothing(tmp_path: Path, peers: dict[str, str], problem: str) -> None:
    path = write_config(tmp_path, peers={"alice": ALICE, "bob": BOB})
    runtime, reloader = runtime_for(path)
    before = dict(runtime._peers)
    write_config(tmp_path, peers=peers)
    with pytest.raises(control.ControlError) as info:
        await reloader.reload()
    assert "reload refused, nothing changed" in str(info.value) and problem in str(info.value)
    assert info.value.code is control.ErrorCode.BAD_REQUEST
    assert runtime._peers == before


async def test_other_settings_are_named_as_needing_a_restart(tmp_path: Path) -> None:
    path = write_config(tmp_path, peers={"alice": ALICE})
    _runtime, reloader = runtime_for(path)
    write_config(tmp_path, peers={"alice": ALICE}, extra='mtu = 1380\nnode_id = "gw-9"\n')
    result = await reloader.reload()
    assert result["restart_needed"] == ["mtu", "node_id"] and result["unchanged"] == 1
    assert "changed but applied only by a restart: mtu, node_id" in describe_reload(result)


def test_settings_needing_restart_ignores_the_peers(tmp_path: Path) -> None:
    running = load_gateway_config(write_config(tmp_path, peers={"alice": ALICE}))
    loaded = load_gateway_config(write_config(tmp_path, peers={"bob": BOB}))
    assert settings_needing_restart(running, loaded) == []


async def test_reload_over_the_control_socket_and_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_config(tmp_path, peers={"alice": ALICE})
    _runtime, reloader = runtime_for(path)
    socket = tmp_path / "gw.sock"

    async def reload(_request: dict[str, object]) -> dict[str, object]:
        return await reloader.reload()

    handler = control.command_handler({"reload": reload})
    write_config(tmp_path, peers={"alice": ALICE, "bob": BOB})
    async with trio.open_nursery() as nursery:
        await nursery.start(lambda task_status: control.serve_control(socket, handler, task_status=task_status))
        code = await trio.to_thread.run_sync(lambda: main(["reload", "--socket", str(socket)]))
        assert code == 0
        assert capsys.readouterr().out == "peers reloaded: added bob; 1 unchanged; 0 session(s) closed (PEER_REMOVED)\n"
        write_config(tmp_path, peers={"alice": ALICE, "twin": ALICE})
        code = await trio.to_thread.run_sync(lambda: main(["reload", "--socket", str(socket), "--json"]))
        assert code == 2
        assert "reload refused, nothing changed" in capsys.readouterr().err
        nursery.cancel_scope.cancel()


def test_reload_without_a_gateway_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["reload", "--socket", str(tmp_path / "none.sock")]) == 2
    assert capsys.readouterr().err == f"jvpn-trio: no jvpn-trio running at {tmp_path / 'none.sock'} (socket missing)\n"


def test_a_reloaded_peer_keeps_its_configured_address(tmp_path: Path) -> None:
    path = write_config(tmp_path, peers={"alice": ALICE})
    (tmp_path / "peers.d" / "alice.toml").write_text(f'public_key = "{ALICE}"\naddress = "10.66.0.9"\n')
    assert load_gateway_config(path).peers[0].address == ipaddress.IPv4Address("10.66.0.9")
