#!/usr/bin/env bash
# The README's test command: install the requirements, build the package against the
# installed TensorFlow (editable, so the tests import the built libraries), run pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q -r requirements.txt -r requirements-dev.txt
python3 -m pip install -q --no-build-isolation -e .
python3 -m pytest -q "$@"
