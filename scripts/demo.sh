#!/usr/bin/env bash
# The README's demo command: install the requirements and the build tools, build and
# install the package as users do (not editable), and run the demo from outside the
# source tree, so that Python imports the installed package. Arguments go to the demo.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
python3 -m pip install -q -r "$root/requirements.txt" $(python3 "$root/scripts/build_tools.py")
python3 -m pip install -q --no-build-isolation "$root"
mkdir -p "${TMPDIR:-/tmp}/fused_segloss_demo"
cd "${TMPDIR:-/tmp}/fused_segloss_demo"
python3 -m fused_segloss demo --out "$PWD" "$@"
