"""A user's install: ``pip install .`` (not editable) in a fresh venv, then the demo from elsewhere.

An editable install or a run from the checkout hides files that exist only in
the source tree (the demo's scenario once lived in ``examples/``).  This test
copies the tracked files to a temporary directory, installs them the way a user
does, and runs ``jvpn-trio demo --short --no-tui`` from a directory that holds
no source, with the checkout off ``sys.path``.  It needs pip to reach the
package index (or its cache) for the dependencies; it skips with that reason
otherwise, and in CI a skip fails.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import venv

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
INSTALL_TIMEOUT_S = 600
DEMO_TIMEOUT_S = 120
#: Bound on the quick commands around them (``git ls-files``, asking the venv where the package is).
QUICK_COMMAND_TIMEOUT_S = 30


def _tracked_files() -> list[str]:
    try:
        out = subprocess.run(
            ["git", "-C", str(ROOT), "ls-files", "-z"], check=True, capture_output=True, timeout=QUICK_COMMAND_TIMEOUT_S
        ).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"needs a git checkout to know which files a release holds ({exc})")
    return [name for name in out.decode().split("\0") if name]


def _copy_release(dest: pathlib.Path) -> None:
    for name in _tracked_files():
        src = ROOT / name
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            os.symlink(os.readlink(src), target)
        elif src.is_file():
            shutil.copy2(src, target)


@pytest.mark.slow
def test_a_non_editable_install_runs_the_demo_from_anywhere(tmp_path: pathlib.Path) -> None:
    source = tmp_path / "source"
    _copy_release(source)
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", str(source)],
        capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S, env=env,
    )  # fmt: skip
    if install.returncode != 0 and "No matching distribution" in install.stderr:
        pytest.skip(f"pip cannot reach the dependencies here: {install.stderr.strip().splitlines()[-1]}")
    assert install.returncode == 0, install.stderr[-2000:]
    shutil.rmtree(source)  # nothing may be read from the source tree any more

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    demo = subprocess.run(
        [str(env_dir / "bin" / "jvpn-trio"), "demo", "--short", "--no-tui"],
        cwd=elsewhere, capture_output=True, text=True, timeout=DEMO_TIMEOUT_S, env=env,
    )  # fmt: skip
    assert demo.returncode == 0, demo.stderr[-2000:]
    assert "TRANSPORT_SWITCH" in demo.stdout
    assert "client TERMINATED (LOCAL_CLOSE)" in demo.stdout

    # The installed package is the one that ran: no import from the checkout.
    where = subprocess.run(
        [str(python), "-c", "import jvpn_trio, sys; sys.stdout.write(jvpn_trio.__file__)"],
        cwd=elsewhere, capture_output=True, text=True, timeout=QUICK_COMMAND_TIMEOUT_S, env=env,
    )  # fmt: skip
    assert str(env_dir) in where.stdout and str(ROOT) not in where.stdout
    assert sys.prefix != str(env_dir)
