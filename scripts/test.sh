#!/usr/bin/env bash
# The README's test command: install the requirements and the build tools, build the
# package editable against the installed TensorFlow (so the tests import the built
# libraries), run pytest (the doctests of the package's public docstrings included).
set -euo pipefail
cd "$(dirname "$0")/.."
# A --no-build-isolation build uses this environment's tools (pyproject.toml's list).
python3 -m pip install -q -r requirements.txt -r requirements-dev.txt $(python3 scripts/build_tools.py)
python3 -m pip install -q --no-build-isolation -e .
# Two pytest-xdist workers: most of the suite's time is single-threaded (tracing, Python,
# subprocesses), so two workers keep two cores busy; more would mostly add TF start-ups.
python3 -m pytest -q -n 2 "$@"
