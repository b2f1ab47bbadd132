"""The demo behind `python -m fused_segloss demo` (see run.py)."""
from .run import RUNS, main, parse_args

__all__ = ["main", "parse_args", "RUNS"]
