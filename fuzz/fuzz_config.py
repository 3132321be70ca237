"""atheris target: the config loader, on arbitrary file contents (issue 15, "Inputs that never crash").

Every input is written to one file and handed to one loader (the first byte picks which:
``read_toml``, the policy, client, gateway or scenario loader).  The property: the loader returns,
or raises ConfigError with a one-line message; anything else is a crash atheris reports with the
input that caused it.  The hypothesis twin that runs in CI is tests/properties/test_config_fuzz.py.

atheris is not a dependency of the project (it needs a libFuzzer build for the Python in use):

    pip install atheris
    python fuzz/fuzz_config.py -runs=1000000 -max_len=4096 [CORPUS_DIR]
"""

from __future__ import annotations

import os
import tempfile

import atheris  # type: ignore[import-untyped,import-not-found,unused-ignore]
from fuzzing import run

with atheris.instrument_imports():
    import tomllib  # noqa: F401  (instrumented here, before the loaders import it)

    from jvpn_trio.config import (
        ConfigError,
        load_client_config,
        load_gateway_config,
        load_policy,
        read_toml,
    )
    from jvpn_trio.lab.scenario import load_scenario

LOADERS = (read_toml, load_policy, load_client_config, load_gateway_config, load_scenario)
#: One anonymous file (nothing to clean up, however libFuzzer ends the process), named through /proc.
FD = os.open(tempfile.gettempdir(), os.O_TMPFILE | os.O_RDWR, 0o600)
PATH = f"/proc/self/fd/{FD}"


def test_one_input(data: bytes) -> None:
    if not data:
        return
    load = LOADERS[data[0] % len(LOADERS)]
    os.ftruncate(FD, 0)
    os.pwrite(FD, data[1:], 0)
    try:
        load(PATH)
    except ConfigError as exc:
        message = str(exc)
        if not message or "\n" in message or "\r" in message:
            raise AssertionError(f"not one line: {message!r}") from None


def main() -> None:
    run(test_one_input)


if __name__ == "__main__":
    main()
