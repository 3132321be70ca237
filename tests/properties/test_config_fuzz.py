"""Fuzzing the config loader and the policy: garbage only ever raises the documented error.

Properties (issue 15, "Inputs that never crash"):

* ``read_toml`` and every loader built on it (policy, client, gateway, scenario) either return
  their value or raise ConfigError with a one-line message, on random TOML-like text (tokens of
  real files shuffled with arbitrary text) and on random bytes;
* ``Policy.from_mapping`` either returns a Policy or raises PolicyError, on random mappings
  whose keys are mostly real field names and whose values are any TOML (or Python) value, near
  the declared ranges or far from them; what it returns survives its own round trip.

Determinism: hypothesis draws the inputs (its database replays failures); the files are written
under one temporary directory per module; nothing reads a clock or the network.
"""

from __future__ import annotations

import math
import pathlib
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jvpn_trio.config import (
    ConfigError,
    load_client_config,
    load_gateway_config,
    load_policy,
    read_toml,
)
from jvpn_trio.core.policy import Policy, PolicyError
from jvpn_trio.lab.scenario import load_scenario

FUZZ = settings(deadline=None, max_examples=300, suppress_health_check=[HealthCheck.too_slow])

FIELDS = [a.name for a in attrs.fields(Policy)]
CONFIG_KEYS = [
    "client", "gateway", "policy", "path", "peer", "step", "private_key_file", "gateway_public_key", "gateway",
    "routes", "listen", "mtu", "tun_name", "interface", "match", "kind", "priority", "metered", "public_key",
    "address", "address6", "tunnel_address", "tunnel_address6", "dns", "dns_search", "exclude", "kill_switch",
    "control_port_offset", "duration_s", "short_duration_s", "at_s", "name", "loss_pct", "delay_ms", "link",
]  # fmt: skip
#: Pieces of real TOML: headers, keys, every kind of value, and the punctuation that nests.
TOKENS = [
    "[policy]", "[client]", "[gateway]", "[[path]]", "[[peer]]", "[[step]]", "\n", " = ", "=", "[", "]", "{", "}",
    ",", ".", '"', "'", '"""', "#", "0", "1", "-1", "50", "1e308", "-0.0", "nan", "inf", "-inf", "true", "false",
    "0x" + "f" * 40, "9" * 30, "1979-05-27T07:32:00Z", '"10.0.0.1/24"', '"192.0.2.1:51820"', '"eth0"', '"lte"',
    '"wifi*"', '"\\u0000"', '"\\n"', "\\", "\t", "\r\n",
    *(f"{name} = " for name in FIELDS), *(f"{key} = " for key in CONFIG_KEYS),
]  # fmt: skip

toml_ish = st.one_of(
    st.lists(st.sampled_from(TOKENS) | st.text(max_size=4), max_size=60).map("".join),
    st.text(max_size=200),
)


@pytest.fixture(scope="module")
def workdir() -> Iterator[pathlib.Path]:
    with tempfile.TemporaryDirectory(prefix="jvpn-config-fuzz-") as name:
        yield pathlib.Path(name)


LOADERS: dict[str, Callable[[pathlib.Path], object]] = {
    "read_toml": read_toml,
    "policy": load_policy,
    "client": load_client_config,
    "gateway": load_gateway_config,
    "scenario": load_scenario,
}


def _only_config_errors(load: Callable[[pathlib.Path], object], path: pathlib.Path) -> None:
    try:
        load(path)
    except ConfigError as exc:
        message = str(exc)
        assert message and "\n" not in message and "\r" not in message
        assert str(path) in message or message.startswith("'")


@pytest.mark.parametrize("loader", sorted(LOADERS))
@FUZZ
@given(text=toml_ish)
def test_any_text_loads_or_is_one_config_error(workdir: pathlib.Path, loader: str, text: str) -> None:
    path = workdir / f"{loader}.toml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    _only_config_errors(LOADERS[loader], path)


@FUZZ
@given(data=st.binary(max_size=300))
def test_any_bytes_load_or_are_one_config_error(workdir: pathlib.Path, data: bytes) -> None:
    path = workdir / "bytes.toml"
    path.write_bytes(data)
    for load in LOADERS.values():
        _only_config_errors(load, path)


@FUZZ
@given(depth=st.integers(1, 2_000), opener=st.sampled_from(["[", "{a=", "[{a=", "a."]))
def test_any_nesting_loads_or_is_one_config_error(workdir: pathlib.Path, depth: int, opener: str) -> None:
    closer = {"[": "]", "{a=": "}", "[{a=": "}]", "a.": ""}[opener]
    text = ("a" if opener == "a." else "x = ") + opener * depth + ("a = 1" if opener == "a." else "1") + closer * depth
    path = workdir / "nested.toml"
    path.write_text(text)
    for load in LOADERS.values():
        _only_config_errors(load, path)


# -- Policy.from_mapping ---------------------------------------------------------------------------------

scalars = st.one_of(
    st.integers(),
    st.integers(min_value=-(1 << 70), max_value=1 << 70),
    st.integers(min_value=-3, max_value=3_600_001),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=0.0, max_value=100_000.0),
    st.booleans(),
    st.none(),
    st.text(max_size=8),
)
values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=8
)
#: A field's value: mostly near what it accepts (its default, an edge, one past it), sometimes anything.
near_valid = st.sampled_from(FIELDS).flatmap(
    lambda name: st.tuples(
        st.just(name),
        st.one_of(
            st.just(getattr(Policy(), name)),
            st.sampled_from([1, 2, 100, 1_000, 59_999, 60_000, 86_399, 86_400, 3_600_000, 0.1, 59_999.0, 1 << 64]),
            values,
        ),
    )
)
mappings = st.one_of(
    st.lists(near_valid, max_size=8).map(dict),
    st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=6), values, max_size=6),
    values,
)


@FUZZ
@given(data=mappings)
def test_any_mapping_is_a_policy_or_a_policy_error(data: Any) -> None:
    try:
        policy = Policy.from_mapping(data)
    except PolicyError as exc:
        assert str(exc)
        return
    # What was accepted is a policy through and through: every rule holds again, the fingerprint
    # is computable, and the mapping round-trips.
    assert Policy.from_mapping(policy.to_mapping()) == policy
    assert len(policy.fingerprint) == 16
    for name in FIELDS:
        value = getattr(policy, name)
        assert value is None or (isinstance(value, (int, float)) and math.isfinite(value))
