"""``pytest tests/ui --regen`` rewrites the golden frames in tests/data/ui/ (then review the diff)."""

from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--regen",
        action="store_true",
        default=False,
        help="rewrite tests/data/ui/*.txt from the current views instead of comparing",
    )
