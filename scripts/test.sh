#!/usr/bin/env bash
# Set up a virtual environment with the project and its test extra, then run the whole suite.
# Works on a fresh machine with only Python >= 3.11 and pip.  Root-only tests (TUN, netns)
# run when this is run as root and skip with a stated reason otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
python -m pip install --quiet -e '.[test]'
exec python -m pytest "$@"
