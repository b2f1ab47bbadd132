#!/usr/bin/env bash
# The README's test command: install the requirements and the build tools, build the
# package editable against the installed TensorFlow (so the tests import the built
# libraries), run pytest (the doctests of the package's public docstrings included).
set -euo pipefail
cd "$(dirname "$0")/.."
# A --no-build-isolation build uses this environment's tools: pyproject.toml's
# [build-system] list is the one place they are written.
build_tools=$(python3 -c 'import re; print(re.search(r"requires = \[(.*?)\]", open("pyproject.toml").read()).group(1).replace(",", " ").replace("\"", ""))')
python3 -m pip install -q -r requirements.txt -r requirements-dev.txt $build_tools
python3 -m pip install -q --no-build-isolation -e .
python3 -m pytest -q "$@"
