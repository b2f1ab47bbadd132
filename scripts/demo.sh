#!/usr/bin/env bash
# The README's main command: install, build, and run the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q -r requirements.txt
python3 -m pip install -q --no-build-isolation -e .
python3 -m fused_segloss demo "$@"
