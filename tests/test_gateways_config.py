"""config.py: the client's ``[[gateway]]`` entries beside the single ``gateway`` / ``gateway_public_key`` keys.

Each test writes its own file under ``tmp_path``; every refusal is one ConfigError line naming the file
and the entry.
"""

from __future__ import annotations

import pathlib

import pytest

from jvpn_trio.config import ConfigError, GatewayEntry, load_client_config
from jvpn_trio.drivers.killswitch import KillSwitchSpec

HEAD = """\
[client]
private_key_file = "client.key"
"""
SINGLE = HEAD + """\
gateway_public_key = "KEYA"
gateway = "192.0.2.1:51820"
"""
TWO = HEAD + """\
[[gateway]]
endpoint = "192.0.2.1:51820"
public_key = "KEYA"

[[gateway]]
endpoint = "198.51.100.7:51830"
public_key = "KEYB"
"""


def write(tmp_path: pathlib.Path, text: str) -> pathlib.Path:
    path = tmp_path / "client.toml"
    path.write_text(text, encoding="utf-8")
    return path


def error(tmp_path: pathlib.Path, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_client_config(write(tmp_path, text))
    message = str(info.value)
    assert "\n" not in message
    assert str(tmp_path / "client.toml") in message
    return message


def test_entries_in_order_of_preference(tmp_path: pathlib.Path) -> None:
    cfg = load_client_config(write(tmp_path, TWO))
    assert cfg.gateway_entries == (
        GatewayEntry(endpoint=("192.0.2.1", 51820), public_key="KEYA"),
        GatewayEntry(endpoint=("198.51.100.7", 51830), public_key="KEYB"),
    )
    # The first is the one the single-gateway keys named: family, the UI's title, the path manager.
    assert cfg.gateway == ("192.0.2.1", 51820)
    assert cfg.gateway_public_key == "KEYA"
    assert cfg.gateway_control == ("192.0.2.1", 51821)


def test_single_form_is_one_entry(tmp_path: pathlib.Path) -> None:
    cfg = load_client_config(write(tmp_path, SINGLE))
    assert cfg.gateways == ()
    assert cfg.gateway_entries == (GatewayEntry(endpoint=("192.0.2.1", 51820), public_key="KEYA"),)


def test_one_entry_and_a_shared_key(tmp_path: pathlib.Path) -> None:
    shared = TWO.replace('"KEYB"', '"KEYA"')
    assert [g.public_key for g in load_client_config(write(tmp_path, shared)).gateway_entries] == ["KEYA", "KEYA"]
    one = HEAD + '[[gateway]]\nendpoint = "[2001:db8::1]:51820"\npublic_key = "K"\n'
    assert load_client_config(write(tmp_path, one)).gateway_entries == (
        GatewayEntry(endpoint=("2001:db8::1", 51820), public_key="K"),
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (TWO.replace(HEAD, SINGLE), "[client]: gateway and gateway_public_key beside [[gateway]] entries: use one form"),
        (TWO.replace(HEAD, HEAD + 'gateway = "192.0.2.1:51820"\n'),
         "[client]: gateway beside [[gateway]] entries: use one form"),
        (TWO.replace(HEAD, HEAD + 'gateway_public_key = "K"\n'),
         "[client]: gateway_public_key beside [[gateway]] entries: use one form"),
        (TWO.replace('public_key = "KEYB"\n', ""), "[[gateway]] #2: missing required key 'public_key'"),
        (TWO.replace('endpoint = "192.0.2.1:51820"\n', ""), "[[gateway]] #1: missing required key 'endpoint'"),
        (TWO.replace('"KEYB"', '""'), "[[gateway]] #2.public_key: empty"),
        (TWO.replace('"198.51.100.7:51830"', '"gw.example:1"'),
         "[[gateway]] #2.endpoint: 'gw.example' is not an IP address (names are not resolved)"),
        (TWO.replace('"198.51.100.7:51830"', "51830"), "[[gateway]] #2.endpoint: expected str, got int"),
        (TWO + 'weight = 3\n', "[[gateway]] #2: unknown key(s): weight"),
        (TWO.replace('"198.51.100.7:51830"', '"192.0.2.1:51820"'),
         "[[gateway]] #2.endpoint: 192.0.2.1:51820 is listed twice"),
        (TWO.replace('"198.51.100.7:51830"', '"192.0.2.1:51821"'),
         "[[gateway]] #2 and #1 share the endpoint 192.0.2.1:51821 (data or control, control_port_offset apart)"),
        (TWO.replace('"198.51.100.7:51830"', '"[2001:db8::1]:51820"'),
         "[[gateway]] endpoints mix IPv4 and IPv6: the path sockets are of one family"),
        (HEAD + '[[gateway]]\nendpoint = "[2001:db8::1]:1"\npublic_key = "K"\n'
         '[[gateway]]\nendpoint = "[2001:db8::2]:1"\npublic_key = "K"\n',
         "[[gateway]] endpoints on several IPv6 hosts are not supported yet"),
        (HEAD + "gateway = []\n", "[client]: missing required key"),
        (HEAD.replace("[client]", "gateway = []\n[client]"), "[[gateway]] must be a non-empty array of tables"),
        (HEAD + '[gateway]\nendpoint = "192.0.2.1:1"\n', "[[gateway]] must be a non-empty array of tables"),
        (TWO.replace(HEAD, HEAD + "control_port_offset = 65535\n"),
         "[client].control_port_offset: 65535 with data port 51820 gives no usable control port"),
    ],
)
def test_refused(tmp_path: pathlib.Path, text: str, message: str) -> None:
    assert message in error(tmp_path, text)


def test_the_kill_switch_lets_out_every_gateway(tmp_path: pathlib.Path) -> None:
    cfg = load_client_config(write(tmp_path, TWO))
    assert cfg.gateway_endpoints == (
        ("192.0.2.1", 51820), ("192.0.2.1", 51821), ("198.51.100.7", 51830), ("198.51.100.7", 51831),
    )  # fmt: skip
    assert KillSwitchSpec.from_config(cfg).gateways == cfg.gateway_endpoints
