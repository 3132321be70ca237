"""Suite-wide rules.

In CI (``CI`` set to a true value, as `.ci/run` runs) no test may be skipped:
the root and namespace tests are real tests there, so a skip, whatever its
reason, becomes a failure that names it.  Elsewhere skips stay skips, each
with its reason (pytest's ``-ra`` lists them).
"""

from __future__ import annotations

import os

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    outcome = yield
    report = outcome.get_result()
    if IN_CI and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped in CI, where every test must run: {reason}"
