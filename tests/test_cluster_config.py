"""The gateway's ``[cluster]`` table, and ``serve`` opening the store it names (docs/cluster.md)."""

from __future__ import annotations

import pathlib
import socket

import pytest
import trio

from jvpn_trio.commands.process import AppError
from jvpn_trio.commands.serve import open_ownership_store, settings_needing_restart
from jvpn_trio.config import ClusterConfig, ConfigError, load_gateway_config
from jvpn_trio.drivers.store_memory import MemoryOwnershipStore

GATEWAY = """\
[gateway]
private_key_file = "gateway.key"
node_id = "gw-b"

[[peer]]
public_key = "PEERKEY1"
"""


def load(tmp_path: pathlib.Path, cluster: str) -> ClusterConfig:
    path = tmp_path / "gateway.toml"
    path.write_text(GATEWAY + cluster, encoding="utf-8")
    return load_gateway_config(path).cluster


def error(tmp_path: pathlib.Path, cluster: str) -> str:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, cluster)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_without_the_table_the_store_is_in_memory(tmp_path: pathlib.Path) -> None:
    assert load(tmp_path, "") == ClusterConfig() and ClusterConfig().store == "memory"


def test_an_etcd_cluster_table_is_read(tmp_path: pathlib.Path) -> None:
    cluster = load(
        tmp_path,
        """
[cluster]
store = "etcd"
etcd_endpoints = ["http://10.0.0.5:2379", "http://[fd00::6]:2379", "https://etcd-3.example:2379"]
lease_ttl_ms = 6000
request_timeout_ms = 1000
keepalive_interval_ms = 1500
lease_margin_ms = 500
key_prefix = "/vpn/sessions/"
""",
    )
    assert cluster == ClusterConfig(
        store="etcd",
        etcd_endpoints=("http://10.0.0.5:2379", "http://[fd00::6]:2379", "https://etcd-3.example:2379"),
        lease_ttl_ms=6000,
        request_timeout_ms=1000,
        keepalive_interval_ms=1500,
        lease_margin_ms=500,
        key_prefix="/vpn/sessions/",
    )


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        ('store = "zookeeper"', "store: 'zookeeper' is not one of memory, etcd"),
        ('store = "etcd"', "needs at least one endpoint"),
        ('store = "etcd"\netcd_endpoints = ["10.0.0.5:2379"]', "is not an etcd URL"),
        ('store = "etcd"\netcd_endpoints = ["http://10.0.0.5:99999"]', "port out of range"),
        ('store = "etcd"\netcd_endpoints = [2379]', "expected strings"),
        ('etcd_endpoints = ["http://a:1"]\nlease_ttl_ms = 0', "lease_ttl_ms: 0 must be positive"),
        ('etcd_endpoints = ["http://a:1"]\nlease_margin_ms = -1', "lease_margin_ms: -1 must be at least 0"),
        ("lease_ttl_ms = 3000", "must be below lease_ttl_ms rounded up to seconds (3000)"),
        ('key_prefix = "sessions"', "must start with /"),
        ("leases = 1", "unknown key(s): leases"),
        ('lease_ttl_ms = "10s"', "lease_ttl_ms: expected int"),
        ("store_calls_in_flight = 0", "store_calls_in_flight: 0 is"),
        ("store_calls_in_flight = 5000", "store_calls_in_flight: 5000 is"),
    ],
)
def test_bad_cluster_tables_are_one_line_errors(tmp_path: pathlib.Path, table: str, expected: str) -> None:
    assert expected in error(tmp_path, "\n[cluster]\n" + table + "\n")


def test_announce_interface_is_off_by_default(tmp_path: pathlib.Path) -> None:
    assert load(tmp_path, "\n[cluster]\n").announce_interface is None


def test_announce_interface_is_read(tmp_path: pathlib.Path) -> None:
    cluster = load(tmp_path, '\n[cluster]\nannounce_interface = "eth1.20"\n')
    assert cluster == ClusterConfig(announce_interface="eth1.20")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ('""', "announce_interface: an empty name matches no interface"),
        ('"eth 0"', "announce_interface: 'eth 0' is not an interface name"),
        ('"eth*"', "announce_interface: 'eth*' looks like a glob"),
        ('"a-name-of-16-chr"', "announce_interface: 'a-name-of-16-chr' is longer than 15 characters"),
        ('["eth0"]', "announce_interface: expected str, got list"),
    ],
)
def test_a_bad_announce_interface_is_a_one_line_error(tmp_path: pathlib.Path, value: str, expected: str) -> None:
    assert expected in error(tmp_path, f"\n[cluster]\nannounce_interface = {value}\n")


def test_an_announce_interface_change_needs_a_restart(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(GATEWAY, encoding="utf-8")
    running = load_gateway_config(path)
    path.write_text(GATEWAY + '\n[cluster]\nannounce_interface = "eth1"\n', encoding="utf-8")
    assert settings_needing_restart(running, load_gateway_config(path)) == ["cluster"]


def test_a_cluster_change_needs_a_restart(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(GATEWAY, encoding="utf-8")
    running = load_gateway_config(path)
    path.write_text(GATEWAY + '\n[cluster]\nstore = "etcd"\netcd_endpoints = ["http://127.0.0.1:2379"]\n')
    assert settings_needing_restart(running, load_gateway_config(path)) == ["cluster"]


async def test_the_memory_store_needs_nothing() -> None:
    async with open_ownership_store(ClusterConfig(), "gw-a") as store:
        assert isinstance(store, MemoryOwnershipStore)


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then closed: connecting is refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


async def test_an_unreachable_etcd_stops_serve_at_start_with_one_line() -> None:
    endpoint = f"http://127.0.0.1:{closed_port()}"
    cluster = ClusterConfig(store="etcd", etcd_endpoints=(endpoint,))
    with trio.fail_after(10):
        with pytest.raises(AppError) as info:
            async with open_ownership_store(cluster, "gw-a"):
                pytest.fail("a store without etcd must not open")
    assert str(info.value).startswith(f"etcd not reachable at {endpoint}: ")
    assert "cannot connect" in str(info.value) and "\n" not in str(info.value)


def test_store_calls_in_flight_is_read(tmp_path: pathlib.Path) -> None:
    assert load(tmp_path, "\n[cluster]\n").store_calls_in_flight == 32
    assert load(tmp_path, "\n[cluster]\nstore_calls_in_flight = 4\n").store_calls_in_flight == 4
