"""Prints pyproject.toml's [build-system] requirements, the one list of build tools, for
`pip install` before a --no-build-isolation build (which uses the tools installed here)."""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
with open(os.path.join(ROOT, "pyproject.toml"), encoding="utf-8") as f:
    requires = re.search(r"^requires = \[(.*?)\]", f.read(), re.M | re.S).group(1)
print(" ".join(re.findall(r'"([^"]+)"', requires)))
