"""Command line: `python -m fused_segloss demo [...]` or `python -m fused_segloss bench [...]`.

The quiet TensorFlow log level of the command line is set in the package's __init__, which
`python -m` runs (and which loads TensorFlow) before this module.
"""
import sys

USAGE = """usage: python -m fused_segloss COMMAND [options]

commands:
  demo    train a small U-Net on synthetic multi-label images and print every class's
          loss terms (python -m fused_segloss demo --help)
  bench   benchmark the code paths (python -m fused_segloss bench --help)
"""


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, end="")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "demo":
        from .demo import main as demo_main

        return demo_main(rest)
    if command == "bench":
        from . import bench

        return bench.main(rest)
    print(f"unknown command {command!r}\n\n{USAGE}", end="", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
