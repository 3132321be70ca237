"""config.py: TOML policy, client and gateway files, and every way a file can be unusable.

Determinism: each test writes its own file under ``tmp_path``; no network, no
clock.  Every error is a ConfigError whose one-line message names the file and
either the TOML position or the policy field.
"""

from __future__ import annotations

import ipaddress
import os
import pathlib
import tomllib

import attrs
import pytest

from jvpn_trio import config
from jvpn_trio.config import (
    DEFAULT_MTU,
    DEFAULT_PORT,
    KIND_PRIORITY,
    MAX_CONFIG_BYTES,
    MAX_CONFIG_DEPTH,
    MAX_ERROR_CHARS,
    PATH_KINDS,
    ClientConfig,
    ConfigError,
    GatewayConfig,
    PathConfig,
    PeerConfig,
    load_client_config,
    load_gateway_config,
    load_policy,
    parse_endpoint,
    policy_from_table,
    read_toml,
)
from jvpn_trio.core.candidates import PathRule, PathRules
from jvpn_trio.core.policy import DEFAULT_POLICY


def write(tmp_path: pathlib.Path, text: str, name: str = "policy.toml") -> pathlib.Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def config_error(path: object) -> str:
    with pytest.raises(ConfigError) as info:
        load_policy(path)  # type: ignore[arg-type]
    message = str(info.value)
    assert "\n" not in message
    return message


# -- reading the file -------------------------------------------------------------------


def test_missing_file(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "absent.toml"
    assert config_error(path) == f"{path}: no such file"


def test_directory(tmp_path: pathlib.Path) -> None:
    assert config_error(tmp_path) == f"{tmp_path}: is a directory"


def test_permission_denied(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Tests may run as root, where chmod cannot deny a read; simulate the OS answer instead
    # (tests/test_config_cli.py denies it for real, as another user).
    path = write(tmp_path, "")

    def deny(name: object, *args: object, **kwargs: object) -> int:
        raise PermissionError(13, "Permission denied", str(name))

    monkeypatch.setattr(os, "open", deny)  # the module config.py reads with
    assert config_error(path) == f"{path}: permission denied"


def test_other_open_errors_are_one_line(tmp_path: pathlib.Path) -> None:
    plain = write(tmp_path, "")
    assert config_error(plain / "below-a-file.toml") == f"{plain}/below-a-file.toml: cannot open: Not a directory"
    loop = tmp_path / "loop.toml"
    loop.symlink_to(loop)
    assert config_error(loop) == f"{loop}: cannot open: Too many levels of symbolic links"
    assert config_error("nul\0byte.toml") == "'nul\\x00byte.toml': not a usable file name"


def test_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path: pathlib.Path) -> None:
    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)
    assert config_error(fifo) == f"{fifo}: not a regular file (a FIFO)"


def test_a_device_is_refused() -> None:
    assert config_error("/dev/zero") == "/dev/zero: not a regular file (a character device)"


def test_a_file_over_the_size_limit_is_refused_before_parsing(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert MAX_CONFIG_BYTES == 32 << 20
    monkeypatch.setattr(config, "MAX_CONFIG_BYTES", 100)
    parsed: list[str] = []

    def loads(text: str) -> dict[str, object]:
        parsed.append(text)
        return {}

    monkeypatch.setattr(tomllib, "loads", loads)
    at_limit = write(tmp_path, "#" * 100, name="at.toml")
    assert read_toml(at_limit) == {}
    over = write(tmp_path, "#" * 101, name="over.toml")
    assert config_error(over) == f"{over}: larger than 100 bytes, the most a config file may be"
    assert parsed == ["#" * 100]


def test_the_size_limit_reads_no_more_than_one_byte_past_it(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(config, "MAX_CONFIG_BYTES", 100)
    asked: list[int] = []
    real_read = os.read

    def read(fd: int, n: int) -> bytes:
        asked.append(n)
        return real_read(fd, n)

    monkeypatch.setattr(os, "read", read)
    huge = write(tmp_path, "#" * 10_000)
    config_error(huge)
    assert sum(asked) == 101


@pytest.mark.parametrize(
    "text",
    [
        "x = " + "[" * 3_000 + "]" * 3_000,  # past the parser's recursion
        "x = " + "{a=" * 3_000 + "1" + "}" * 3_000,
        "x = " + "[" * 17 + "]" * 17,  # parses, but deeper than the limit
        "a" + ".a" * 100 + " = 1",  # dotted keys nest without recursion
        "[" + "a." * 20 + "a]\nb = 1",
    ],
    ids=["arrays", "inline-tables", "just-too-deep", "dotted-keys", "table-header"],
)
def test_deep_nesting_is_one_line(tmp_path: pathlib.Path, text: str) -> None:
    path = write(tmp_path, text)
    assert config_error(path) == f"{path}: tables and arrays nested deeper than {MAX_CONFIG_DEPTH} levels"


def test_nesting_up_to_the_limit_is_read(tmp_path: pathlib.Path) -> None:
    depth = MAX_CONFIG_DEPTH - 1  # the document is level 1
    path = write(tmp_path, "x = " + "[" * depth + "]" * depth)
    assert read_toml(path)["x"] is not None


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        (f"x = {-(1 << 63)}", True),
        (f"x = {(1 << 64) - 1}", True),
        (f"x = {-(1 << 63) - 1}", False),
        (f"x = {1 << 64}", False),
        ("x = 0x" + "f" * 5_000, False),
    ],
)
def test_integers_beyond_64_bits_are_refused(tmp_path: pathlib.Path, text: str, ok: bool) -> None:
    path = write(tmp_path, text)
    if ok:
        read_toml(path)
    else:
        assert config_error(path) == (
            f"{path}: an integer outside -9223372036854775808..18446744073709551615 (TOML's 64 bits)"
        )


def test_a_number_too_long_for_python_is_one_line(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, "x = " + "1" * 5_000)
    assert config_error(path) == f"{path}: a number too long to read (TOML's integers are 64-bit)"


def test_control_characters_in_a_quoted_key_stay_on_one_line(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, '[policy]\n"evil\\nkey\\u001b[2J" = 1\n')
    message = config_error(path)
    assert message.startswith(f"{path}: [policy] unknown policy key(s): evil\\nkey\\x1b[2J (known: ")


def test_a_long_error_is_cut_to_the_limit(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, "[policy]\n" + "k" * 10_000 + " = 1\n")
    message = config_error(path)
    assert len(message) == MAX_ERROR_CHARS
    assert message.endswith("\u2026")


def test_config_error_escapes_and_cuts_what_it_is_given() -> None:
    assert str(ConfigError("a\nb\tc\x00")) == "a\\nb\\tc\\x00"
    assert str(ConfigError("x" * 1_000)) == "x" * (MAX_ERROR_CHARS - 1) + "\u2026"


def test_not_utf8(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b"# caf\xe9\nmax_switches_per_minute = 3\n")
    assert config_error(path) == f"{path}: not UTF-8 text"


def test_bad_toml_names_file_and_position(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, "[policy]\nmax_switches_per_minute = = 3\n")
    assert config_error(path) == f"{path}: invalid TOML: Invalid value (at line 2, column 27)"


def test_bad_toml_duplicate_key(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, "[policy]\nmin_dwell_ms = 1\nmin_dwell_ms = 2\n")
    message = config_error(path)
    assert message.startswith(f"{path}: invalid TOML: ")
    assert "(at line 3, column " in message


def test_read_toml_returns_the_parsed_document(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, "[policy]\nmin_dwell_ms = 0\n[other]\nx = 'y'\n")
    assert read_toml(path) == {"policy": {"min_dwell_ms": 0}, "other": {"x": "y"}}
    assert read_toml(str(path)) == read_toml(path)


# -- the [policy] table and top-level keys ----------------------------------------------------


def test_policy_table(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, "[policy]\nmax_switches_per_minute = 3\nmin_dwell_ms = 0\n")
    assert load_policy(path) == attrs.evolve(DEFAULT_POLICY, max_switches_per_minute=3, min_dwell_ms=0)


def test_top_level_policy_keys(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, "max_switches_per_minute = 3\nmin_dwell_ms = 0\n")
    assert load_policy(path) == attrs.evolve(DEFAULT_POLICY, max_switches_per_minute=3, min_dwell_ms=0)


def test_table_and_top_level_forms_are_the_same_policy(tmp_path: pathlib.Path) -> None:
    a = load_policy(write(tmp_path, "[policy]\nreturn_dwell_ms = 7000\n", "a.toml"))
    b = load_policy(write(tmp_path, "return_dwell_ms = 7000\n", "b.toml"))
    assert a == b
    assert a.fingerprint == b.fingerprint


def test_empty_file_and_empty_table_are_the_default(tmp_path: pathlib.Path) -> None:
    assert load_policy(write(tmp_path, "", "empty.toml")) == DEFAULT_POLICY
    assert load_policy(write(tmp_path, "[policy]\n", "table.toml")) == DEFAULT_POLICY


def test_path_may_be_a_string(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, "[policy]\nmin_dwell_ms = 0\n")
    assert load_policy(str(path)).min_dwell_ms == 0


def test_toml_integer_for_a_float_field(tmp_path: pathlib.Path) -> None:
    policy = load_policy(write(tmp_path, "[policy]\nloss_threshold_pct = 12\n"))
    assert policy.loss_threshold_pct == 12.0
    assert type(policy.loss_threshold_pct) is float


def test_tables_beside_policy_are_rejected(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, "[policy]\nmin_dwell_ms = 0\n[zeta]\nx = 1\n[gateway]\ny = 2\n")
    assert config_error(path) == f"{path}: unexpected key(s) beside [policy]: gateway, zeta"


def test_top_level_key_beside_policy_is_rejected(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, "name = 'laptop'\n[policy]\nmin_dwell_ms = 0\n")
    assert config_error(path) == f"{path}: unexpected key(s) beside [policy]: name"


def test_other_table_without_policy_is_an_unknown_policy_key(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, "[gateway]\nlisten = 51820\n")
    message = config_error(path)
    assert message.startswith(f"{path}: [policy] unknown policy key(s): gateway (known: ")


def test_policy_that_is_not_a_table(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, "policy = 5\n")
    assert config_error(path) == f"{path}: [policy] policy must be a table, got int"


# -- policy values: the message names the file and the field ---------------------------------------


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("max_switches_per_minute = 0", "max_switches_per_minute: 0 is out of range 1..600"),
        ('max_switches_per_minute = "six"', "max_switches_per_minute: expected an integer, got str"),
        ("max_switches_per_minute = true", "max_switches_per_minute: expected an integer, got bool"),
        ("max_switches_per_minute = 6.0", "max_switches_per_minute: expected an integer, got float"),
        ("loss_threshold_pct = 0.0", "loss_threshold_pct: 0.0 is out of range 0.1..100.0"),
        ("loss_threshold_pct = false", "loss_threshold_pct: expected a number, got bool"),
        ("loss_threshold_pct = nan", "loss_threshold_pct: nan is out of range 0.1..100.0"),
        ("healthy_below_fraction = [0.5]", "healthy_below_fraction: expected a number, got list"),
    ],
)
def test_bad_policy_value(tmp_path: pathlib.Path, line: str, expected: str) -> None:
    path = write(tmp_path, f"[policy]\n{line}\n")
    assert config_error(path) == f"{path}: [policy] {expected}"


def test_bad_top_level_policy_value_is_reported_the_same_way(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, "probe_interval_ms = 0\n")
    assert config_error(path) == f"{path}: [policy] probe_interval_ms: 0 is out of range 1..60000"


def test_inconsistent_policy(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, "[policy]\nmax_recovery_window_ms = 3000\nreattach_timeout_ms = 3000\n")
    assert config_error(path) == (
        f"{path}: [policy] reattach_timeout_ms (3000) must be under max_recovery_window_ms (3000) "
        "so recovery can try at least once"
    )


def test_unknown_policy_key(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, "[policy]\nmax_switches = 3\n")
    assert config_error(path).startswith(f"{path}: [policy] unknown policy key(s): max_switches (known: ")


def test_policy_from_table_uses_the_given_source() -> None:
    assert policy_from_table({"min_dwell_ms": 0}, source="x") == attrs.evolve(DEFAULT_POLICY, min_dwell_ms=0)
    with pytest.raises(ConfigError) as info:
        policy_from_table({"min_dwell_ms": -1}, source="client.toml")
    assert str(info.value) == "client.toml: [policy] min_dwell_ms: -1 is out of range 0..3600000"
    assert info.value.__cause__ is None


# -- endpoints -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("192.0.2.1:51820", ("192.0.2.1", 51820)),
        ("0.0.0.0:0", ("0.0.0.0", 0)),
        ("10.0.0.1:65535", ("10.0.0.1", 65535)),
        ("[2001:db8::1]:443", ("2001:db8::1", 443)),
        ("[::1]:51820", ("::1", 51820)),
    ],
)
def test_parse_endpoint(text: str, expected: tuple[str, int]) -> None:
    assert parse_endpoint(text, where="w") == expected


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (5, "w: expected 'address:port', got 5"),
        (None, "w: expected 'address:port', got None"),
        ("192.0.2.1", "w: expected 'address:port', got '192.0.2.1'"),
        ("vpn.example.com:51820", "w: 'vpn.example.com' is not an IP address (names are not resolved)"),
        ("192.0.2.1:", "w: bad port ''"),
        ("192.0.2.1:http", "w: bad port 'http'"),
        ("192.0.2.1:65536", "w: bad port '65536'"),
        ("192.0.2.1:-1", "w: bad port '-1'"),
        ("2001:db8::1", "w: '2001:db8:' is not an IP address (names are not resolved)"),
    ],
)
def test_parse_endpoint_errors(value: object, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_endpoint(value, where="w")
    assert str(info.value) == message


# -- client.toml --------------------------------------------------------------------------------------------

CLIENT_MINIMAL = """\
[client]
private_key_file = "client.key"
gateway_public_key = "GATEWAYPUBLICKEY"
gateway = "192.0.2.1:51820"
"""


def client_error(tmp_path: pathlib.Path, text: str) -> tuple[pathlib.Path, str]:
    path = write(tmp_path, text, "client.toml")
    with pytest.raises(ConfigError) as info:
        load_client_config(path)
    assert "\n" not in str(info.value)
    return path, str(info.value)


def test_client_minimal_defaults(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, CLIENT_MINIMAL, "client.toml")
    cfg = load_client_config(path)
    assert cfg == ClientConfig(
        private_key_file=tmp_path.resolve() / "client.key",
        gateway_public_key="GATEWAYPUBLICKEY",
        gateway=("192.0.2.1", 51820),
        control_port_offset=1,
        tun_name="jvpn0",
        routes=(ipaddress.IPv4Network("0.0.0.0/0"), ipaddress.IPv6Network("::/0")),  # a full tunnel of both families
        paths=(),
        events_file=None,
        control_socket=pathlib.Path("/run/jvpn-trio/client.sock"),
        fwmark_base=0x5100,
        policy=DEFAULT_POLICY,
        kill_switch=True,  # a full tunnel blocks the rest by default
    )


def test_client_full(tmp_path: pathlib.Path) -> None:
    text = """\
[client]
private_key_file = "/etc/jvpn/client.key"
gateway_public_key = "K"
gateway = "[2001:db8::1]:4000"
tun_name = "tun-x"
routes = ["10.66.0.0/24", "192.168.0.0/16"]
events_file = "logs/events.jsonl"
control_socket = "/tmp/c.sock"
fwmark_base = 512

[[path]]
interface = "eth0"
kind = "ethernet"

[[path]]
interface = "wwan0"
kind = "lte"
priority = 5

[[path]]
interface = "usb0"

[policy]
max_switches_per_minute = 3
"""
    cfg = load_client_config(write(tmp_path, text, "client.toml"))
    assert cfg.private_key_file == pathlib.Path("/etc/jvpn/client.key")
    assert cfg.gateway == ("2001:db8::1", 4000)
    assert cfg.tun_name == "tun-x"
    assert cfg.routes == (ipaddress.IPv4Network("10.66.0.0/24"), ipaddress.IPv4Network("192.168.0.0/16"))
    assert cfg.events_file == tmp_path.resolve() / "logs" / "events.jsonl"
    assert cfg.control_socket == pathlib.Path("/tmp/c.sock")
    assert cfg.fwmark_base == 512
    assert cfg.paths == (
        PathConfig(interface="eth0", kind="ethernet", priority=None),
        PathConfig(interface="wwan0", kind="lte", priority=5),
        PathConfig(interface="usb0", kind=None, priority=None),
    )
    assert cfg.policy == attrs.evolve(DEFAULT_POLICY, max_switches_per_minute=3)


def test_kind_priorities() -> None:
    assert PATH_KINDS == ("ethernet", "wifi", "lte")
    assert KIND_PRIORITY == {"ethernet": 10, "wifi": 20, "lte": 30}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "[client]: expected a table"),
        ("client = 5\n", "[client]: expected a table"),
        (CLIENT_MINIMAL + "[server]\nx = 1\n", "unknown table(s): server"),
        (CLIENT_MINIMAL.replace('private_key_file = "client.key"\n', ""),
         "[client]: missing required key 'private_key_file'"),
        (CLIENT_MINIMAL.replace('gateway_public_key = "GATEWAYPUBLICKEY"\n', ""),
         "[client]: missing required key 'gateway_public_key'"),
        (CLIENT_MINIMAL.replace('gateway = "192.0.2.1:51820"\n', ""), "[client]: missing required key 'gateway'"),
        (CLIENT_MINIMAL.replace('"192.0.2.1:51820"', "51820"), "[client].gateway: expected str, got int"),
        (CLIENT_MINIMAL.replace('"192.0.2.1:51820"', '"gw.example:1"'),
         "[client].gateway: 'gw.example' is not an IP address (names are not resolved)"),
        (CLIENT_MINIMAL + "fwmark_base = true\n", "[client].fwmark_base: expected int, got bool"),
        (CLIENT_MINIMAL + "fwmark_base = 1.5\n", "[client].fwmark_base: expected int, got float"),
        (CLIENT_MINIMAL + "fwmark_base = -1\n", "[client].fwmark_base: -1 is out of range 0..4294967040"),
        (CLIENT_MINIMAL + "fwmark_base = 4294967041\n", "[client].fwmark_base: 4294967041 is out of range 0..4294967040"),
        (CLIENT_MINIMAL + "routes = [167772160]\n",
         "[client].routes: expected prefixes as strings like '10.0.0.0/8', got int 167772160"),
        (CLIENT_MINIMAL + "routes = [true]\n", "[client].routes: expected prefixes as strings like '10.0.0.0/8', got bool True"),
        (CLIENT_MINIMAL + "dns = [[1]]\n", "[client].dns: expected addresses as strings like '10.66.0.1', got list [1]"),
        (CLIENT_MINIMAL + "routes = []\n", "[client].routes: expected a non-empty list of prefixes"),
        (CLIENT_MINIMAL + 'routes = "0.0.0.0/0"\n', "[client].routes: expected list, got str"),
        (CLIENT_MINIMAL + 'routes = ["10.0.0.1/8"]\n', "[client].routes: '10.0.0.1/8' is not an IPv4 or IPv6 prefix (host bits must be zero)"),
        (CLIENT_MINIMAL + 'routes = ["2001:db8::1/32"]\n', "[client].routes: '2001:db8::1/32' is not an IPv4 or IPv6 prefix (host bits must be zero)"),
        (CLIENT_MINIMAL + 'routes = ["10.0.0.0/8"]\nkill_switch = true\n',
         "[client].kill_switch: only a full tunnel (0.0.0.0/0 or ::/0 in routes) can block the rest"),
        (CLIENT_MINIMAL + "kill_switch = 1\n", "[client].kill_switch: expected bool, got int"),
        (CLIENT_MINIMAL + "allow_lan = 'yes'\n", "[client].allow_lan: expected bool, got str"),
        (CLIENT_MINIMAL + 'dns = ["10.66.0.1", "resolver"]\n', "[client].dns: 'resolver' is not an IP address"),
        (CLIENT_MINIMAL + 'dns = "10.66.0.1"\n', "[client].dns: expected list, got str"),
        (CLIENT_MINIMAL + 'dns = ["10.66.0.1"]\ndns_search = ["-bad.example"]\n', "[client].dns_search: '-bad.example' is not a domain name"),
        (CLIENT_MINIMAL + 'dns_search = ["corp.example"]\n', "[client].dns_search: search domains need servers in dns"),
        (CLIENT_MINIMAL + "mtu = 575\n", "[client].mtu: 575 is out of range 576..65535"),
        (CLIENT_MINIMAL + 'routes = ["0.0.0.0/0", "::/0"]\nmtu = 1279\n', "[client].mtu: 1279 is below 1280, the least IPv6 in the tunnel needs"),
        (CLIENT_MINIMAL + "zeta = 1\nalpha = 2\n", "[client]: unknown key(s): alpha, zeta"),
        (CLIENT_MINIMAL + 'tun_name = "a-very-long-name0"\n',
         "[client].tun_name 'a-very-long-name0' is longer than 15 characters"),
        ('path = "eth0"\n' + CLIENT_MINIMAL, "[[path]] must be an array of tables"),
        (CLIENT_MINIMAL + "[[path]]\npriority = 3\n",
         "[[path]] #1: needs 'interface' (one name), 'match' (a glob) or 'kind' (every link of a kind)"),
        (CLIENT_MINIMAL + "[[path]]\ninterface = 'wlan0'\nmatch = 'wl*'\n",
         "[[path]] #1: give 'interface' or 'match', not both"),
        (CLIENT_MINIMAL + "[[path]]\nmatch = ''\n", "[[path]] #1.match: an empty glob matches no interface"),
        (CLIENT_MINIMAL + "[[path]]\ninterface = ''\n", "[[path]] #1.interface: an empty name matches no interface"),
        (CLIENT_MINIMAL + "[[path]]\nmatch = 'wl *'\n",
         "[[path]] #1.match: 'wl *' is not an interface glob (no spaces, '/' or ':')"),
        (CLIENT_MINIMAL + "[[path]]\ninterface = 'wl*'\n",
         "[[path]] #1.interface: 'wl*' looks like a glob: use 'match' for globs"),
        (CLIENT_MINIMAL + "[[path]]\ninterface = 'a-very-long-name0'\n",
         "[[path]] #1.interface: 'a-very-long-name0' is longer than 15 characters"),
        (CLIENT_MINIMAL + "[[path]]\nmatch = 5\n", "[[path]] #1.match: expected str, got int"),
        (CLIENT_MINIMAL + "[[path]]\nkind = 'satellite'\n",
         "[[path]] #1.kind: expected one of ethernet, wifi, lte, got 'satellite'"),
        (CLIENT_MINIMAL + "[[path]]\nmatch = 'wl*'\n[[path]]\nmatch = 'wl*'\nkind = 'lte'\n",
         "a match glob is listed twice in [[path]]"),
        (CLIENT_MINIMAL + "[[path]]\nkind = 'lte'\n[[path]]\nkind = 'lte'\npriority = 1\n",
         "a kind is listed alone twice in [[path]]"),
        (CLIENT_MINIMAL + "[[path]]\ninterface = 'jvpn0'\n",
         "[[path]] #1.interface: 'jvpn0' is the tunnel's own interface ([client].tun_name)"),
        (CLIENT_MINIMAL + "exclude = ['docker*']\n[[path]]\ninterface = 'docker0'\n",
         "[[path]] #1.interface: 'docker0' is excluded by [client].exclude 'docker*'"),
        (CLIENT_MINIMAL + "exclude = 'docker*'\n", "[client].exclude: expected list, got str"),
        (CLIENT_MINIMAL + "exclude = ['']\n", "[client].exclude: an empty glob matches no interface"),
        (CLIENT_MINIMAL + "exclude = [1]\n", "[client].exclude: expected a list of strings, got int 1"),
        (CLIENT_MINIMAL + "[[path]]\ninterface = 'a'\n[[path]]\ninterface = 'b'\nkind = 'satellite'\n",
         "[[path]] #2.kind: expected one of ethernet, wifi, lte, got 'satellite'"),
        (CLIENT_MINIMAL + "[[path]]\ninterface = 'a'\npriority = '1'\n", "[[path]] #1.priority: expected int, got str"),
        (CLIENT_MINIMAL + "[[path]]\ninterface = 'a'\nmetric = 1\n", "[[path]] #1: unknown key(s): metric"),
        (CLIENT_MINIMAL + "[[path]]\ninterface = 'a'\n[[path]]\ninterface = 'a'\n",
         "an interface is listed twice in [[path]]"),
        (CLIENT_MINIMAL + "[policy]\nmin_dwell_ms = -1\n", "[policy] min_dwell_ms: -1 is out of range 0..3600000"),
    ],
    ids=lambda v: v if isinstance(v, str) and "\n" not in v and len(v) < 60 else None,
)
def test_client_errors(tmp_path: pathlib.Path, text: str, message: str) -> None:
    path, got = client_error(tmp_path, text)
    assert got == f"{path}: {message}"


def test_path_rule_forms(tmp_path: pathlib.Path) -> None:
    text = CLIENT_MINIMAL + """\
exclude = ["docker*", "veth*"]

[[path]]
interface = "eth0"

[[path]]
match = "wl*"
priority = 15

[[path]]
match = "usb*"
kind = "lte"
metered = false

[[path]]
kind = "lte"
"""
    cfg = load_client_config(write(tmp_path, text, "client.toml"))
    assert cfg.path_rules == PathRules(
        rules=(
            PathRule(interface="eth0"),
            PathRule(match="wl*", priority=15),
            PathRule(match="usb*", kind="lte", metered=False),  # an unlimited plan: not the kind's default
            PathRule(kind="lte"),
        ),
        exclude=("docker*", "veth*"),
    )
    # The fixed list of today's runtime keeps the entries that name one interface.
    assert cfg.paths == (PathConfig(interface="eth0", kind=None, priority=None),)


def test_interface_only_config_gives_the_same_rules(tmp_path: pathlib.Path) -> None:
    text = CLIENT_MINIMAL + '[[path]]\ninterface = "eth0"\nkind = "ethernet"\n[[path]]\ninterface = "wwan0"\npriority = 5\n'
    cfg = load_client_config(write(tmp_path, text, "client.toml"))
    assert cfg.paths == (
        PathConfig(interface="eth0", kind="ethernet", priority=None),
        PathConfig(interface="wwan0", kind=None, priority=5),
    )
    assert cfg.path_rules.rules == (
        PathRule(interface="eth0", kind="ethernet"),
        PathRule(interface="wwan0", priority=5),
    )
    assert cfg.path_rules.exclude == ()


def test_client_config_constructor_needs_no_path_rules() -> None:
    """Other modules build ClientConfig by keyword; the new field has a default."""
    fields = attrs.fields_dict(ClientConfig)
    assert fields["path_rules"].default == PathRules()


def test_client_missing_file(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_client_config(tmp_path / "none.toml")
    assert str(info.value) == f"{tmp_path / 'none.toml'}: no such file"


# -- gateway.toml ----------------------------------------------------------------------------------------------

GATEWAY_MINIMAL = """\
[gateway]
private_key_file = "gateway.key"

[[peer]]
public_key = "PEERKEY1"
"""


def gateway_error(tmp_path: pathlib.Path, text: str) -> tuple[pathlib.Path, str]:
    path = write(tmp_path, text, "gateway.toml")
    with pytest.raises(ConfigError) as info:
        load_gateway_config(path)
    assert "\n" not in str(info.value)
    return path, str(info.value)


def test_gateway_minimal_defaults(tmp_path: pathlib.Path) -> None:
    cfg = load_gateway_config(write(tmp_path, GATEWAY_MINIMAL, "gateway.toml"))
    assert cfg == GatewayConfig(
        private_key_file=tmp_path.resolve() / "gateway.key",
        listen=(("0.0.0.0", DEFAULT_PORT),),
        control_port_offset=1,
        tun_name="jvpn-gw0",
        tunnel_address=ipaddress.IPv4Interface("10.66.0.1/24"),
        mtu=DEFAULT_MTU,
        peers=(PeerConfig(name="peer1", public_key="PEERKEY1", address=None),),
        events_file=None,
        control_socket=pathlib.Path("/run/jvpn-trio/gateway.sock"),
        node_id="gw-1",
        policy=DEFAULT_POLICY,
    )
    assert (DEFAULT_PORT, DEFAULT_MTU) == (51820, 1420)
    assert cfg.control_listen == (("0.0.0.0", DEFAULT_PORT + 1),)


def test_control_port_offset_is_configurable_on_both_sides(tmp_path: pathlib.Path) -> None:
    """The control socket is the data port + 1 unless both sides say otherwise."""
    assert load_client_config(write(tmp_path, CLIENT_MINIMAL, "client.toml")).gateway_control == ("192.0.2.1", 51821)
    client = CLIENT_MINIMAL + "control_port_offset = -100\n"
    assert load_client_config(write(tmp_path, client, "client.toml")).gateway_control == ("192.0.2.1", 51720)
    gateway = _gw("listen = ['0.0.0.0:4000', '[::]:5000']\ncontrol_port_offset = 10\n")
    cfg = load_gateway_config(write(tmp_path, gateway, "gateway.toml"))
    assert cfg.control_listen == (("0.0.0.0", 4010), ("::", 5010))


@pytest.mark.parametrize("offset", [0, 65536, -51820])
def test_a_control_offset_that_gives_no_port_is_rejected(tmp_path: pathlib.Path, offset: int) -> None:
    _, message = client_error(tmp_path, CLIENT_MINIMAL + f"control_port_offset = {offset}\n")
    assert f"[client].control_port_offset: {offset} with data port 51820 gives no usable control port" in message
    _, message = gateway_error(tmp_path, _gw(f"control_port_offset = {offset}\n"))
    assert f"[gateway].control_port_offset: {offset} with data port 51820" in message


def test_gateway_full(tmp_path: pathlib.Path) -> None:
    text = """\
[gateway]
private_key_file = "keys/gw.key"
listen = ["192.0.2.1:51820", "[2001:db8::1]:51820"]
tun_name = "gw0"
tunnel_address = "10.9.0.1/16"
mtu = 576
events_file = "/var/log/jvpn.jsonl"
control_socket = "/tmp/g.sock"
node_id = "gw-b"

[[peer]]
name = "laptop"
public_key = "K1"
address = "10.9.3.4"

[[peer]]
public_key = "K2"

[policy]
freshness_window_ms = 1000
"""
    cfg = load_gateway_config(write(tmp_path, text, "gateway.toml"))
    assert cfg.private_key_file == tmp_path.resolve() / "keys" / "gw.key"
    assert cfg.listen == (("192.0.2.1", 51820), ("2001:db8::1", 51820))
    assert cfg.tun_name == "gw0"
    assert cfg.tunnel_address == ipaddress.IPv4Interface("10.9.0.1/16")
    assert cfg.mtu == 576
    assert cfg.events_file == pathlib.Path("/var/log/jvpn.jsonl")
    assert cfg.control_socket == pathlib.Path("/tmp/g.sock")
    assert cfg.node_id == "gw-b"
    assert cfg.peers == (
        PeerConfig(name="laptop", public_key="K1", address=ipaddress.IPv4Address("10.9.3.4")),
        PeerConfig(name="peer2", public_key="K2", address=None),
    )
    assert cfg.policy == attrs.evolve(DEFAULT_POLICY, freshness_window_ms=1000)


def test_client_leak_dns_and_mtu_keys(tmp_path: pathlib.Path) -> None:
    text = CLIENT_MINIMAL + (
        'routes = ["0.0.0.0/0", "::/0"]\nallow_lan = true\ndns = ["10.66.0.1", "fd6a:7670::1"]\n'
        'dns_search = ["Corp.Example.", "lab"]\nmtu = 1380\n'
    )
    cfg = load_client_config(write(tmp_path, text, "client.toml"))
    assert cfg.routes == (ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0"))
    assert cfg.full_tunnel and cfg.kill_switch and cfg.allow_lan
    assert cfg.dns == (ipaddress.ip_address("10.66.0.1"), ipaddress.ip_address("fd6a:7670::1"))
    assert cfg.dns_search == ("corp.example", "lab") and cfg.mtu == 1380
    split = load_client_config(write(tmp_path, CLIENT_MINIMAL + 'routes = ["10.66.0.0/24"]\n', "split.toml"))
    assert not split.full_tunnel and not split.kill_switch and split.mtu is None
    off = load_client_config(write(tmp_path, CLIENT_MINIMAL + "kill_switch = false\n", "off.toml"))
    assert off.full_tunnel and not off.kill_switch


def test_gateway_ipv6_tunnel_addresses(tmp_path: pathlib.Path) -> None:
    text = _gw("tunnel_address6 = 'fd6a:7670::1/64'\n").replace(
        '[[peer]]\npublic_key = "PEERKEY1"\n',
        '[[peer]]\npublic_key = "PEERKEY1"\naddress = "10.66.0.7"\n'
        '[[peer]]\npublic_key = "PEERKEY2"\naddress = "10.66.0.8"\naddress6 = "fd6a:7670::beef"\n'
        '[[peer]]\npublic_key = "PEERKEY3"\n',
    )
    cfg = load_gateway_config(write(tmp_path, text, "gateway.toml"))
    assert cfg.tunnel_address6 == ipaddress.IPv6Interface("fd6a:7670::1/64")
    # The same host number in both families, unless given.
    assert [p.address6 for p in cfg.peers] == [
        ipaddress.IPv6Address("fd6a:7670::7"), ipaddress.IPv6Address("fd6a:7670::beef"), None,
    ]  # fmt: skip
    clash = text.replace('address6 = "fd6a:7670::beef"', 'address6 = "fd6a:7670::7"')
    _, message = gateway_error(tmp_path, clash)
    assert "[[peer]] #2.address6: fd6a:7670::7 is already given to another peer" in message
    outside = text.replace('address6 = "fd6a:7670::beef"', 'address6 = "fd00::8"')
    _, message = gateway_error(tmp_path, outside)
    assert "[[peer]] #2.address6: fd00::8 is not a free host address of fd6a:7670::/64" in message
    without = _gw("").replace('[[peer]]\npublic_key = "PEERKEY1"\n', '[[peer]]\npublic_key = "PEERKEY1"\naddress6 = "fd6a:7670::9"\n')
    _, message = gateway_error(tmp_path, without)
    assert "[[peer]] #1.address6: needs [gateway].tunnel_address6" in message


def test_gateway_mtu_upper_bound(tmp_path: pathlib.Path) -> None:
    text = GATEWAY_MINIMAL.replace('"gateway.key"\n', '"gateway.key"\nmtu = 65535\n')
    assert load_gateway_config(write(tmp_path, text, "gateway.toml")).mtu == 65535


def _gw(extra: str) -> str:
    return GATEWAY_MINIMAL.replace('"gateway.key"\n', '"gateway.key"\n' + extra)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "[gateway]: expected a table"),
        (GATEWAY_MINIMAL + "[client]\n", "unknown table(s): client"),
        ("[gateway]\n[[peer]]\npublic_key = 'K'\n", "[gateway]: missing required key 'private_key_file'"),
        (_gw("mtu = 575\n"), "[gateway].mtu: 575 is out of range 576..65535"),
        (_gw("mtu = 65536\n"), "[gateway].mtu: 65536 is out of range 576..65535"),
        (_gw("mtu = '1420'\n"), "[gateway].mtu: expected int, got str"),
        (_gw("tunnel_address6 = 'fd6a:7670::1'\nmtu = 1200\n"), "[gateway].mtu: 1200 is below 1280, the least a tunnel carrying IPv6 needs"),
        (_gw("tunnel_address6 = '10.66.0.1/24'\n"), "[gateway].tunnel_address6: expected an IPv6 address with prefix like 'fd6a:7670::1/64', got '10.66.0.1/24'"),
        (_gw("listen = '0.0.0.0:1'\n"), "[gateway].listen: expected list, got str"),
        (_gw("listen = [51820]\n"), "[gateway].listen: expected 'address:port', got 51820"),
        (_gw("tunnel_address = '10.66.0.1/33'\n"),
         "[gateway].tunnel_address: expected an IPv4 address with prefix like '10.66.0.1/24', got '10.66.0.1/33'"),
        (_gw("tunnel_address = 'fd00::1/64'\n"),
         "[gateway].tunnel_address: expected an IPv4 address with prefix like '10.66.0.1/24', got 'fd00::1/64'"),
        (_gw("colour = 'red'\n"), "[gateway]: unknown key(s): colour"),
        ("[gateway]\nprivate_key_file = 'k'\n", "at least one [[peer]] with a public_key is required"),
        ("peer = []\n[gateway]\nprivate_key_file = 'k'\n", "at least one [[peer]] with a public_key is required"),
        ("peer = 5\n[gateway]\nprivate_key_file = 'k'\n", "[[peer]] must be an array of tables"),
        (GATEWAY_MINIMAL + "[[peer]]\nname = 'x'\n", "[[peer]] #2: missing required key 'public_key'"),
        (GATEWAY_MINIMAL + "[[peer]]\npublic_key = 'K2'\nallowed_ips = []\n", "[[peer]] #2: unknown key(s): allowed_ips"),
        (GATEWAY_MINIMAL + "[[peer]]\npublic_key = 'PEERKEY1'\n", "the public key of peer 'peer2' is also peer 'peer1''s"),
        (GATEWAY_MINIMAL + "address = 'ten'\n", "[[peer]] #1.address: 'ten' is not an IPv4 address"),
        (GATEWAY_MINIMAL + "address = '10.67.0.2'\n", "[[peer]] #1.address: 10.67.0.2 is not a free host address of 10.66.0.0/24"),
        (GATEWAY_MINIMAL + "address = '10.66.0.1'\n", "[[peer]] #1.address: 10.66.0.1 is not a free host address of 10.66.0.0/24"),
        (GATEWAY_MINIMAL + "[policy]\nbogus = 1\n", "[policy] unknown policy key(s): bogus (known: "),
    ],
    ids=lambda v: v if isinstance(v, str) and "\n" not in v and len(v) < 60 else None,
)
def test_gateway_errors(tmp_path: pathlib.Path, text: str, message: str) -> None:
    path, got = gateway_error(tmp_path, text)
    if message.endswith("(known: "):
        assert got.startswith(f"{path}: {message}")
    else:
        assert got == f"{path}: {message}"


def test_gateway_empty_listen_is_rejected(tmp_path: pathlib.Path) -> None:
    gateway_error(tmp_path, _gw("listen = []\n"))


def test_gateway_duplicate_peer_address_is_rejected(tmp_path: pathlib.Path) -> None:
    text = GATEWAY_MINIMAL + "address = '10.66.0.2'\n[[peer]]\npublic_key = 'K2'\naddress = '10.66.0.2'\n"
    gateway_error(tmp_path, text)


@pytest.mark.parametrize("address", ["10.66.0.0", "10.66.0.255"])
def test_gateway_peer_address_not_network_or_broadcast(tmp_path: pathlib.Path, address: str) -> None:
    gateway_error(tmp_path, GATEWAY_MINIMAL + f"address = '{address}'\n")


def test_gateway_nat_is_on_by_default_with_the_egress_found_at_start(tmp_path: pathlib.Path) -> None:
    cfg = load_gateway_config(write(tmp_path, GATEWAY_MINIMAL, "gateway.toml"))
    assert (cfg.nat, cfg.nat_egress) == (True, None)
    cfg = load_gateway_config(write(tmp_path, _gw("nat = false\nnat_egress = 'eth1'\n"), "gateway.toml"))
    assert (cfg.nat, cfg.nat_egress) == (False, "eth1")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("nat = 'yes'\n", "[gateway].nat: expected bool, got str"),
        ("nat_egress = 5\n", "[gateway].nat_egress: expected str, got int"),
        ("nat_egress = ''\n", "[gateway].nat_egress: an empty name matches no interface"),
        ("nat_egress = 'eth*'\n", "[gateway].nat_egress: 'eth*' looks like a glob: use 'match' for globs"),
        ("nat_egress = 'a-very-long-name0'\n", "[gateway].nat_egress: 'a-very-long-name0' is longer than 15 characters"),
        ("nat_egress = 'eth0 accept'\n", "[gateway].nat_egress: 'eth0 accept' is not an interface name (no spaces, '/' or ':')"),
        ("nat_egress = 'eth0\"'\n", "[gateway].nat_egress: 'eth0\"' is not an interface name (A-Za-z0-9_.-)"),
        ("nat_egress = 'eth@0'\n", "[gateway].nat_egress: 'eth@0' is not an interface name (A-Za-z0-9_.-)"),
        ("nat_egress = 'jvpn-gw0'\n", "[gateway].nat_egress: 'jvpn-gw0' is the tunnel's own interface (tun_name)"),
    ],
)
def test_gateway_nat_errors(tmp_path: pathlib.Path, extra: str, message: str) -> None:
    path, got = gateway_error(tmp_path, _gw(extra))
    assert got == f"{path}: {message}"


def test_gateway_metrics_endpoint_is_off_by_default_and_takes_either_family(tmp_path: pathlib.Path) -> None:
    assert load_gateway_config(write(tmp_path, GATEWAY_MINIMAL, "gateway.toml")).metrics_listen is None
    for text, expected in (("127.0.0.1:9587", ("127.0.0.1", 9587)), ("[::1]:9587", ("::1", 9587))):
        cfg = load_gateway_config(write(tmp_path, _gw(f"metrics_listen = '{text}'\n"), "gateway.toml"))
        assert cfg.metrics_listen == expected


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("metrics_listen = 9587\n", "[gateway].metrics_listen: expected str, got int"),
        ("metrics_listen = '127.0.0.1'\n", "[gateway].metrics_listen: expected 'address:port', got '127.0.0.1'"),
        ("metrics_listen = 'localhost:9587'\n",
         "[gateway].metrics_listen: 'localhost' is not an IP address (names are not resolved)"),
        ("metrics_listen = '127.0.0.1:99999'\n", "[gateway].metrics_listen: bad port '99999'"),
        ("metrics_listen = '127.0.0.1:0'\n",
         "[gateway].metrics_listen: port 0 would pick a random port no scraper knows; give a port"),
    ],
)  # fmt: skip
def test_gateway_metrics_listen_errors(tmp_path: pathlib.Path, extra: str, message: str) -> None:
    path, got = gateway_error(tmp_path, _gw(extra))
    assert got == f"{path}: {message}"


# -- shipped examples ------------------------------------------------------------------------------------

EXAMPLE_POLICIES = pathlib.Path(__file__).resolve().parents[2] / "examples" / "policies"


def test_example_policies_load() -> None:
    files = sorted(EXAMPLE_POLICIES.glob("*.toml"))
    if not files:
        pytest.skip(f"no example policies in {EXAMPLE_POLICIES} yet")
    for path in files:
        load_policy(path)


def test_laptop_example_is_the_default() -> None:
    path = EXAMPLE_POLICIES / "laptop.toml"
    if not path.exists():
        pytest.skip(f"{path} not written yet")
    assert load_policy(path) == DEFAULT_POLICY


def test_client_control_socket_access(tmp_path: pathlib.Path) -> None:
    default = load_client_config(write(tmp_path, CLIENT_MINIMAL, "client.toml"))
    assert (default.control_group, default.control_steer_group) == ("jvpn-trio", False)
    text = CLIENT_MINIMAL + 'control_group = "netdev"\ncontrol_steer_group = true\n'
    given = load_client_config(write(tmp_path, text, "given.toml"))
    assert (given.control_group, given.control_steer_group) == ("netdev", True)
    root_only = load_client_config(write(tmp_path, CLIENT_MINIMAL + 'control_group = ""\n', "root.toml"))
    assert root_only.control_group is None
    _, message = client_error(tmp_path, CLIENT_MINIMAL + "control_steer_group = 'yes'\n")
    assert "[client].control_steer_group: expected bool, got str" in message


def test_gateway_peers_dir_adds_one_peer_per_file_named_after_it(tmp_path: pathlib.Path) -> None:
    peers = tmp_path / "peers.d"
    peers.mkdir()
    (peers / "alice.toml").write_text('public_key = "ALICEKEY"\naddress = "10.66.0.10"\n')
    (peers / "bob.toml").write_text('public_key = "BOBKEY"\nname = "bob-laptop"\n')
    (peers / "alice.toml~").write_text("an editor's backup: not a peer\n")
    (peers / ".carol.toml").write_text("hidden: not a peer\n")
    path = write(tmp_path, GATEWAY_MINIMAL.replace("[gateway]\n", "[gateway]\npeers_dir = \"peers.d\"\n"), "gw.toml")
    config = load_gateway_config(path)
    assert [(p.name, p.public_key, p.address) for p in config.peers] == [
        ("peer1", "PEERKEY1", None),
        ("alice", "ALICEKEY", ipaddress.IPv4Address("10.66.0.10")),
        ("bob-laptop", "BOBKEY", None),
    ]
    assert config.peers_dir == peers


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"a.toml": 'public_key = "PEERKEY1"\n'}, "the public key of peer 'a' is also peer 'peer1''s"),
        ({"a.toml": 'public_key = "K"\nport = 1\n'}, "a.toml: unknown key(s): port"),
        ({"a.toml": "public_key = \n"}, "a.toml: invalid TOML"),
        ({"a.toml": 'name = "x"\n'}, "a.toml: missing required key 'public_key'"),
    ],
)
def test_gateway_peers_dir_errors_name_the_file(tmp_path: pathlib.Path, files: dict[str, str], message: str) -> None:
    peers = tmp_path / "peers.d"
    peers.mkdir()
    for name, text in files.items():
        (peers / name).write_text(text)
    path = write(tmp_path, GATEWAY_MINIMAL.replace("[gateway]\n", "[gateway]\npeers_dir = \"peers.d\"\n"), "gw.toml")
    with pytest.raises(ConfigError) as info:
        load_gateway_config(path)
    assert message in str(info.value)


def test_gateway_peers_dir_alone_is_enough_and_a_missing_one_is_an_error(tmp_path: pathlib.Path) -> None:
    head = '[gateway]\nprivate_key_file = "gateway.key"\npeers_dir = "peers.d"\n'
    path = write(tmp_path, head, "gw.toml")
    with pytest.raises(ConfigError, match="peers.d: no such directory"):
        load_gateway_config(path)
    (tmp_path / "peers.d").mkdir()
    with pytest.raises(ConfigError, match=r"at least one \[\[peer\]\] or a file in .*peers.d"):
        load_gateway_config(path)
    (tmp_path / "peers.d" / "only.toml").write_text('public_key = "ONLY"\n')
    assert [p.name for p in load_gateway_config(path).peers] == ["only"]
