"""What every atheris target in this folder shares: its command line (fuzz/README.md).

``python fuzz/fuzz_X.py --seeds DIR`` writes the target's seed corpus; anything else goes to
libFuzzer (``-runs=N``, a corpus directory, a crash file to replay).
"""

from __future__ import annotations

import pathlib
import sys
from collections.abc import Callable

import atheris  # type: ignore[import-untyped,import-not-found,unused-ignore]


def run(test_one_input: Callable[[bytes], None], write_seeds: Callable[[pathlib.Path], int] | None = None) -> None:
    """Write seeds (``--seeds DIR``) or fuzz ``test_one_input`` with libFuzzer's arguments."""
    if write_seeds is not None and sys.argv[1:2] == ["--seeds"]:
        print(f"{write_seeds(pathlib.Path(sys.argv[2]))} seeds written to {sys.argv[2]}")
        return
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
