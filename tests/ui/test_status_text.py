"""``jvpn-trio status`` as text: ``wg show``-like blocks rendered from a JSON reply.

The inputs here are fixed dicts, as ``status --json`` prints them (or as
another version of jvpn-trio might), not snapshots: the text must follow from
the reply alone.  Determinism: no clock and no I/O; the property test draws its
replies with hypothesis (its database replays a failure).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jvpn_trio.ui import status as st_mod
from jvpn_trio.ui.status import render_status_text

CLIENT_REPLY: dict[str, Any] = {
    "role": "client",
    "session": "6a76707472696f2d73657373696f6e31",
    "state": "ATTACHED",
    "sessions_started": 3,
    "tunnel_address": "10.66.0.2/24",
    "tunnel_address6": "fd6a:7670::2/64",
    "version": 9,
    "gateway_version": 9,
    "policy": "5f1c0e2a9b3d4c6e",
    "now_s": 5321.25,
    "session_age_s": 3725.5,
    "binding": "p1@203.0.113.7:51820",
    "active_path": "p1",
    "pinned_path": None,
    "pending_reattach": None,
    "switches_last_minute": 0,
    "max_switches_per_minute": 6,
    "recovery_deadline_in_s": None,
    "unbound_deadline_in_s": None,
    "paths": [
        {
            "path": "p2",
            "interface": "wlan0",
            "kind": "wifi",
            "priority": 20,
            "endpoint": "203.0.113.7:51820",
            "active": False,
            "pinned": False,
            "metered": True,
            "probing": "active",
            "link_up": True,
            "verdict": "IMPAIRED",
            "reason": "LATENCY_ABOVE_THRESHOLD",
            "measured": 412.0,
            "threshold": 250.0,
            "srtt_ms": 412.3,
            "jitter_ms": 88.1,
            "loss_pct": 10.0,
            "consecutive_missed": 2,
            "last_delivery_ago_s": 1.75,
        },
        {
            "path": "p1",
            "interface": "eth0",
            "kind": "ethernet",
            "priority": 10,
            "endpoint": "203.0.113.7:51820",
            "active": True,
            "pinned": False,
            "metered": False,
            "probing": "active",
            "link_up": True,
            "verdict": "HEALTHY",
            "reason": "WITHIN_THRESHOLDS",
            "measured": None,
            "threshold": None,
            "srtt_ms": 4.2,
            "jitter_ms": 0.3,
            "loss_pct": 0.0,
            "consecutive_missed": 0,
            "last_delivery_ago_s": 0.12,
        },
    ],
    "counters": {"rx_bytes": 52_428_800, "tx_bytes": 7_340_032, "session.reattach_sent": 2},
}

EXPECTED_CLIENT = """\
client: 6a76707472696f2d73657373696f6e31
  state:            ATTACHED (version 9, gateway version 9)
  tunnel:           10.66.0.2/24, fd6a:7670::2/64
  sessions started: 3
  binding:          p1@203.0.113.7:51820
  pinned:           -
  switches:         0 of 6 allowed in the last minute
  recovery:         -
  reattach:         -
  session age:      1 hour, 2 minutes, 5 seconds
  transfer:         50.00 MiB received, 7.00 MiB sent
  policy:           5f1c0e2a9b3d4c6e

path: p1 (active)
  interface:        eth0 (ethernet)
  endpoint:         203.0.113.7:51820
  priority:         10
  probing:          active
  link:             up
  verdict:          HEALTHY, WITHIN_THRESHOLDS
  rtt:              4.2 ms (jitter 0.3 ms)
  loss:             0.0%
  last answer:      120 ms ago

path: p2
  interface:        wlan0 (wifi)
  endpoint:         203.0.113.7:51820
  priority:         20
  probing:          active (metered)
  link:             up
  verdict:          IMPAIRED, LATENCY_ABOVE_THRESHOLD (measured 412.0, threshold 250.0)
  rtt:              412.3 ms (jitter 88.1 ms)
  loss:             10.0% (2 missed in a row)
  last answer:      1 second ago

counters:
  rx_bytes:              52428800
  session.reattach_sent: 2
  tx_bytes:              7340032"""

GATEWAY_REPLY: dict[str, Any] = {
    "role": "gateway",
    "node": "gw-fra1",
    "now_s": 90061.5,
    "tunnel_address": "10.66.0.1/24",
    "tunnel_address6": "fd6a:7670::1/64",
    "session_count": 2,
    "states": {"ATTACHED": 1, "VOLATILE": 1},
    "sessions": [
        {
            "session": "0a0b0c0d0e0f10111213141516171819",
            "state": "VOLATILE",
            "version": 4,
            "binding": "p2@[2001:db8::44]:40002",
            "path": "p2",
            "endpoint": "[2001:db8::44]:40002",
            "policy": "5f1c0e2a9b3d4c6e",
            "session_age_s": 90000.0,
            "last_nonce": 3,
            "last_delivery_ago_s": 0.4,
            "switches_last_minute": 2,
            "counters": {},
            "peer": "laptop-bob",
            "public_key": "ICEiIyQlJicoKSorLC0uLzAxMjM0NTY3ODk6Ozw9Pj8=",
            "tunnel_ipv4": "10.66.0.3",
            "tunnel_ipv6": "fd6a:7670::3",
            "last_handshake_ago_s": 95.0,
            "rx_bytes": 1023,
            "tx_bytes": 2048,
            "rx_packets": 9,
            "tx_packets": 12,
        },
        {
            "session": "6a76707472696f2d73657373696f6e31",
            "state": "ATTACHED",
            "version": 9,
            "binding": "p1@198.51.100.20:51999",
            "path": "p1",
            "endpoint": "198.51.100.20:51999",
            "policy": "5f1c0e2a9b3d4c6e",
            "session_age_s": 3725.5,
            "last_nonce": 0,
            "last_delivery_ago_s": 0.05,
            "switches_last_minute": 0,
            "counters": {},
            "peer": "alice",
            "public_key": "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=",
            "tunnel_ipv4": "10.66.0.2",
            "tunnel_ipv6": None,
            "last_handshake_ago_s": 62.9,
            "rx_bytes": 7_340_032,
            "tx_bytes": 52_428_800,
            "rx_packets": 5000,
            "tx_packets": 40000,
        },
    ],
    "counters": {"rx_bytes": 7_341_055, "sessions_created": 2, "tx_bytes": 52_430_848},
}

EXPECTED_GATEWAY = """\
gateway: gw-fra1
  tunnel:           10.66.0.1/24, fd6a:7670::1/64
  sessions:         2 (ATTACHED 1, VOLATILE 1)

peer: alice
  session:          6a76707472696f2d73657373696f6e31
  public key:       AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=
  tunnel:           10.66.0.2
  endpoint:         198.51.100.20:51999 via p1
  state:            ATTACHED (version 9)
  latest handshake: 1 minute, 2 seconds ago
  transfer:         7.00 MiB received, 50.00 MiB sent
  last packet:      50 ms ago
  switches:         0 in the last minute
  session age:      1 hour, 2 minutes, 5 seconds
  policy:           5f1c0e2a9b3d4c6e

peer: laptop-bob
  session:          0a0b0c0d0e0f10111213141516171819
  public key:       ICEiIyQlJicoKSorLC0uLzAxMjM0NTY3ODk6Ozw9Pj8=
  tunnel:           10.66.0.3, fd6a:7670::3
  endpoint:         [2001:db8::44]:40002 via p2
  state:            VOLATILE (version 4)
  latest handshake: 1 minute, 35 seconds ago
  transfer:         1023 B received, 2.00 KiB sent
  last packet:      400 ms ago
  switches:         2 in the last minute
  session age:      1 day, 1 hour
  policy:           5f1c0e2a9b3d4c6e

counters:
  rx_bytes:         7341055
  sessions_created: 2
  tx_bytes:         52430848"""


def test_client_reply_reads_like_wg_show() -> None:
    assert render_status_text(CLIENT_REPLY) == EXPECTED_CLIENT


def test_gateway_reply_has_one_block_per_peer_by_name() -> None:
    assert render_status_text(GATEWAY_REPLY) == EXPECTED_GATEWAY


def test_the_text_is_the_same_from_the_json_on_the_wire() -> None:
    for reply in (CLIENT_REPLY, GATEWAY_REPLY):
        assert render_status_text(json.loads(json.dumps(reply))) == render_status_text(reply)


# -- replies from other versions ------------------------------------------------------------

#: A gateway reply from before the per-peer fields (no peer, addresses, bytes, now_s, path, endpoint).
OLD_GATEWAY_REPLY: dict[str, Any] = {
    "role": "gateway",
    "node": "gw-a",
    "session_count": 1,
    "states": {"ATTACHED": 1},
    "sessions": [
        {
            "session": "000102030405060708090a0b0c0d0e0f",
            "state": "ATTACHED",
            "version": 3,
            "binding": "p1@198.51.100.1:40001",
            "policy": "0123456789abcdef",
            "session_age_s": 50.0,
            "last_nonce": 2,
            "last_delivery_ago_s": 0.25,
            "switches_last_minute": 1,
            "counters": {},
        }
    ],
    "counters": {},
}


def test_an_older_gateway_reply_shows_dashes_for_what_it_lacks() -> None:
    assert render_status_text(OLD_GATEWAY_REPLY) == """\
gateway: gw-a
  tunnel:           -
  sessions:         1 (ATTACHED 1)

peer: -
  session:          000102030405060708090a0b0c0d0e0f
  public key:       -
  tunnel:           -
  endpoint:         -
  state:            ATTACHED (version 3)
  latest handshake: -
  transfer:         -
  last packet:      250 ms ago
  switches:         1 in the last minute
  session age:      50 seconds
  policy:           0123456789abcdef

counters:
  (none)"""


def test_the_agent_between_sessions_before_its_first_snapshot() -> None:
    """What ``up`` answers before the agent published anything: four keys."""
    reply = {"role": "client", "session": None, "state": "CONNECTING", "sessions_started": 0}
    assert render_status_text(reply) == """\
client: -
  state:            CONNECTING
  tunnel:           -
  sessions started: 0
  binding:          -
  pinned:           -
  switches:         -
  recovery:         -
  reattach:         -
  session age:      -
  transfer:         -
  policy:           -

counters:
  (none)"""


def test_values_of_the_wrong_type_print_as_dashes_or_text() -> None:
    reply = {
        "role": "client",
        "state": ["ATTACHED"],
        "session_age_s": "long",
        "paths": [{"path": 1, "srtt_ms": True, "loss_pct": float("nan"), "link_up": "yes"}, "p2", None],
        "counters": ["rx_bytes"],
        "pending_reattach": {"age_ms": -5},
    }
    lines = render_status_text(reply).splitlines()
    assert "  state:            ['ATTACHED']" in lines
    assert "  session age:      -" in lines
    assert "  reattach:         - nonce - (-), sent 0 ms ago" in lines
    assert "path: 1" in lines and "  rtt:              -" in lines and "  link:             -" in lines
    assert "  loss:             -" in lines
    assert lines[-2:] == ["counters:", "  (none)"]


# -- units ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("count", "text"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.00 KiB"),
        (1536, "1.50 KiB"),
        (1024**2 * 3.4, "3.40 MiB"),
        (1024**3, "1.00 GiB"),
        (1024**6, "1024.00 PiB"),
        (-1, "-"),
        (None, "-"),
        ("12", "-"),
        (True, "-"),
    ],
)
def test_bytes_use_binary_prefixes_as_wg_show(count: Any, text: str) -> None:
    assert st_mod._bytes(count) == text


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.0, "0 ms"),
        (0.088, "88 ms"),
        (0.9996, "999 ms"),
        (-3.0, "0 ms"),
        (1.0, "1 second"),
        (59.99, "59 seconds"),
        (63.25, "1 minute, 3 seconds"),
        (3600, "1 hour"),
        (90061.5, "1 day, 1 hour, 1 minute, 1 second"),
        (2 * 86400 + 7200, "2 days, 2 hours"),
        (float("inf"), "-"),
        (None, "-"),
    ],
)
def test_durations_in_whole_units_as_wg_show(seconds: Any, text: str) -> None:
    assert st_mod._duration(seconds) == text


# -- never raises ---------------------------------------------------------------------------

_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
_json = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


def _partial(example: dict[str, Any], **shapes: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    """Any subset of ``example``'s keys, each with its value there, a value of the same shape, or any JSON."""
    optional = {key: shapes.get(key, st.just(value)) | _json for key, value in example.items() if key != "role"}
    return st.fixed_dictionaries({"role": st.just(example["role"])}, optional=optional)


_counters = st.dictionaries(st.text(max_size=12), st.integers(min_value=0))
_client_path = _partial({"role": "path", **CLIENT_REPLY["paths"][0]})
_client = _partial(
    CLIENT_REPLY,
    paths=st.lists(_client_path, max_size=3),
    pending_reattach=st.fixed_dictionaries(
        {}, optional={"path": _json, "nonce": _json, "cause": _json, "age_ms": st.floats() | st.integers()}
    ),
    counters=_counters,
)
_gateway_session = _partial({"role": "session", **GATEWAY_REPLY["sessions"][0]})
_gateway = _partial(
    GATEWAY_REPLY,
    sessions=st.lists(_gateway_session, max_size=3),
    states=st.dictionaries(st.sampled_from(["ATTACHED", "RECOVERING", "ODD"]) | st.text(max_size=4), _json),
    counters=_counters,
)


@settings(deadline=None, max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(_client | _gateway | st.dictionaries(st.text(max_size=6), _json, max_size=4))
def test_rendering_any_partial_reply_never_raises(reply: dict[str, Any]) -> None:
    lines = render_status_text(reply).splitlines()
    if reply.get("role") in ("client", "gateway"):
        assert lines[0].startswith(f"{reply['role']}: ")
        assert "counters:" in lines
        assert all(line == "" or line.startswith(("  ", "path: ", "peer: ", "counters:")) for line in lines[1:])


def test_control_characters_in_a_reply_are_escaped_not_printed() -> None:
    session = {**GATEWAY_REPLY["sessions"][1], "peer": "mallory\n  state: ATTACHED\x1b[2J"}
    lines = render_status_text({**GATEWAY_REPLY, "sessions": [session]}).splitlines()
    assert "peer: mallory\\n  state: ATTACHED\\x1b[2J" in lines
    assert sum(line.startswith("  state:") for line in lines) == 1
