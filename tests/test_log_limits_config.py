"""``[log_limits]`` in gateway.toml and client.toml: the operator's bounds on attack lines (issue 15).

The table is parsed like ``[handshake]``: every key optional, unknown keys refused, each value
checked by ``LogLimits``' own validators (core/bounds.py), every problem one ConfigError line
that names the file, the table and the key.  docs/events.md states each key's default and range:
a test below reads them back from the code.
"""

from __future__ import annotations

import pathlib
import re
from collections.abc import Callable, Mapping

import attrs
import pytest

from jvpn_trio.config import (
    LOG_LIMITS_KEYS,
    ClientConfig,
    ConfigError,
    GatewayConfig,
    load_client_config,
    load_gateway_config,
)
from jvpn_trio.core.bounds import range_of
from jvpn_trio.core.loglimit import DEFAULT_LOG_LIMITS, LogLimits
from tests import test_config_cli as cli_cases
from tests.test_config_cli import assert_one_line_exit_2, run_command

ROOT = pathlib.Path(__file__).resolve().parents[1]

GATEWAY = '[gateway]\nprivate_key_file = "gateway.key"\n[[peer]]\npublic_key = "PEERKEY1"\n'
CLIENT = '[client]\nprivate_key_file = "client.key"\ngateway_public_key = "GW"\ngateway = "192.0.2.1:51820"\n'
LOADERS: dict[str, tuple[str, Callable[[pathlib.Path], GatewayConfig | ClientConfig]]] = {
    "gateway": (GATEWAY, load_gateway_config),
    "client": (CLIENT, load_client_config),
}

#: Every key set away from its default, within its range.
ALL_SET = {
    "burst": 3,
    "refill_ms": 250,
    "lines_per_s": 7,
    "summary_interval_ms": 100,
    "summaries_per_interval": 2,
    "max_line_bytes": 65_536,
    "max_keys": 1,
}


def _table(values: Mapping[str, object]) -> str:
    return "[log_limits]\n" + "".join(f"{k} = {v}\n" for k, v in values.items())


def _load(tmp_path: pathlib.Path, role: str, extra: str) -> LogLimits:
    head, load = LOADERS[role]
    path = tmp_path / f"{role}.toml"
    path.write_text(head + extra)
    return load(path).log_limits


def _error(tmp_path: pathlib.Path, role: str, extra: str) -> str:
    head, load = LOADERS[role]
    path = tmp_path / f"{role}.toml"
    path.write_text(head + extra)
    with pytest.raises(ConfigError) as info:
        load(path)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{path}: [log_limits]"), message
    return message


def _range(name: str) -> tuple[float, float]:
    bounds = range_of(attrs.fields_dict(LogLimits)[name])
    assert bounds is not None, name
    return bounds


# -- what the table sets -------------------------------------------------------------------------


@pytest.mark.parametrize("role", sorted(LOADERS))
def test_without_the_table_the_limits_are_the_defaults(tmp_path: pathlib.Path, role: str) -> None:
    assert _load(tmp_path, role, "") is DEFAULT_LOG_LIMITS
    assert _load(tmp_path, role, "[log_limits]\n") == DEFAULT_LOG_LIMITS


@pytest.mark.parametrize("role", sorted(LOADERS))
def test_every_key_of_the_table_is_taken(tmp_path: pathlib.Path, role: str) -> None:
    assert set(ALL_SET) == set(LOG_LIMITS_KEYS)
    limits = _load(tmp_path, role, _table(ALL_SET))
    assert limits == LogLimits(**ALL_SET)  # type: ignore[arg-type]
    assert limits.kinds == DEFAULT_LOG_LIMITS.kinds


@pytest.mark.parametrize("role", sorted(LOADERS))
def test_keys_left_out_keep_their_defaults(tmp_path: pathlib.Path, role: str) -> None:
    limits = _load(tmp_path, role, "[log_limits]\nlines_per_s = 5\n")
    assert limits == attrs.evolve(DEFAULT_LOG_LIMITS, lines_per_s=5)
    assert limits.max_bytes(1.0) < DEFAULT_LOG_LIMITS.max_bytes(1.0)


@pytest.mark.parametrize("name", LOG_LIMITS_KEYS)
def test_both_ends_of_each_range_are_accepted(tmp_path: pathlib.Path, name: str) -> None:
    lo, hi = _range(name)
    assert getattr(_load(tmp_path, "gateway", _table({name: lo})), name) == lo
    assert getattr(_load(tmp_path, "gateway", _table({name: hi})), name) == hi


# -- what it refuses, in one line ----------------------------------------------------------------


@pytest.mark.parametrize("role", sorted(LOADERS))
@pytest.mark.parametrize("key", ["bogus", "kinds", "Burst"])
def test_an_unknown_key_is_refused(tmp_path: pathlib.Path, role: str, key: str) -> None:
    message = _error(tmp_path, role, f"[log_limits]\nburst = 5\n{key} = 1\n")
    assert message.endswith(f"[log_limits]: unknown key(s): {key}")


@pytest.mark.parametrize("name", LOG_LIMITS_KEYS)
def test_a_value_out_of_range_is_refused_with_the_range(tmp_path: pathlib.Path, name: str) -> None:
    lo, hi = _range(name)
    for value in (lo - 1, hi + 1):
        message = _error(tmp_path, "gateway", _table({name: value}))
        assert message.endswith(f"[log_limits].{name}: {value} is out of range {lo}..{hi}"), message


@pytest.mark.parametrize("role", sorted(LOADERS))
@pytest.mark.parametrize(
    ("text", "type_name"),
    [("1.5", "float"), ("10.0", "float"), ('"10"', "str"), ("true", "bool"), ("[10]", "list"), ("{a = 1}", "dict")],
)
def test_a_value_of_the_wrong_type_is_refused(tmp_path: pathlib.Path, role: str, text: str, type_name: str) -> None:
    message = _error(tmp_path, role, f"[log_limits]\nburst = {text}\n")
    assert message.endswith(f"[log_limits].burst: expected an integer, got {type_name}"), message


@pytest.mark.parametrize("role", sorted(LOADERS))
def test_the_table_must_be_a_table(tmp_path: pathlib.Path, role: str) -> None:
    head, load = LOADERS[role]
    path = tmp_path / "c.toml"
    path.write_text("log_limits = 3\n" + head)
    with pytest.raises(ConfigError) as info:
        load(path)
    assert str(info.value) == f"{path}: [log_limits]: expected a table"


def test_a_bad_table_on_the_command_line_is_one_line_and_exit_2(tmp_path: pathlib.Path) -> None:
    if cli_cases.ROOT and cli_cases.UNSHARE is None:
        pytest.skip("as root, serve and up run in their own network namespace: needs unshare (util-linux)")
    for command, (head, _load) in (("serve", LOADERS["gateway"]), ("up", LOADERS["client"])):
        path = tmp_path / f"{command}.toml"
        path.write_text(head + "[log_limits]\nmax_line_bytes = 255\n")
        line = assert_one_line_exit_2(command, run_command(command, path), names=str(path))
        assert line.endswith("[log_limits].max_line_bytes: 255 is out of range 256..65536"), line


# -- the docs and the example say what the code does ---------------------------------------------

#: A row of the ``[log_limits]`` table in docs/events.md: key, default, range.
_DOC_ROW = re.compile(r"^\| `(\w+)` \| (\d+) \| (\d+)\.\.(\d+) \|", re.MULTILINE)


def test_docs_state_each_key_its_default_and_its_range() -> None:
    text = (ROOT / "docs" / "events.md").read_text()
    section = text[text.index("## Bounded logging of attacks") :]
    rows = {name: (int(default), int(lo), int(hi)) for name, default, lo, hi in _DOC_ROW.findall(section)}
    assert set(rows) == set(LOG_LIMITS_KEYS)
    for name, (default, lo, hi) in rows.items():
        assert (default, lo, hi) == (getattr(DEFAULT_LOG_LIMITS, name), *_range(name)), name


@pytest.mark.parametrize("role", sorted(LOADERS))
def test_the_examples_commented_out_table_loads_as_the_defaults(tmp_path: pathlib.Path, role: str) -> None:
    example = (ROOT / "examples" / f"{role}.toml").read_text()
    block = example[example.index("# [log_limits]") :]
    table = "\n".join(line[2:].split("#")[0] for line in block.splitlines())
    assert "[log_limits]" in table
    assert _load(tmp_path, role, table) == DEFAULT_LOG_LIMITS
