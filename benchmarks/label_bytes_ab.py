"""A/B of the label bytes (fused_segloss/ops.py): the eager fused forward+backward step with
them on and off, in alternating blocks of steps in one process, so that both see the same
drift of the host. Prints, per size and condition, the median step and the medians of the
two ops (the bench's anatomy, fused_segloss/_bench_anatomy.py, times each phase).

    python benchmarks/label_bytes_ab.py                  # 512² and 1024², 6 blocks of 10
    python benchmarks/label_bytes_ab.py --sizes 256 --blocks 2 --steps 5

The bench's path "fused (eager, no label bytes)" gives the same comparison inside its
interleaved rounds, where every step follows other paths' work.
"""
import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from fused_segloss import _bench_anatomy as anatomy, _bench_paths as bp, ops  # noqa: E402

PHASES = {"stats op": "stats op (forward pass)", "grad op": "gradient op (backward pass)"}


def measure(size, condition, action, blocks, steps):
    """{enabled: [(step ms, {phase: ms})] per block}, blocks alternating in order."""
    shape = bp.CaseShape(8, size, 5)
    results = {False: [], True: []}
    saved = ops.label_bytes_enabled
    try:
        for block in range(blocks):
            for enabled in ((False, True) if block % 2 else (True, False)):
                ops.label_bytes_enabled = enabled
                a = anatomy.measure(shape, steps, before_step=action)
                results[enabled].append((a.step_ms, dict(a.intervals_ms)))
    finally:
        ops.label_bytes_enabled = saved
    return results


def line(size, condition, results):
    def med(enabled, phase=None):
        return float(np.median([step if phase is None else phases[PHASES[phase]]
                                for step, phases in results[enabled]]))
    parts = [f"{size}² {condition}: step off {med(False):.2f} on {med(True):.2f} ms "
             f"(on/off {med(True) / med(False):.3f})"]
    parts += [f"{phase} {med(False, phase):.2f} -> {med(True, phase):.2f}" for phase in PHASES]
    return "; ".join(parts)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="512,1024", help="image sides, 8 images x 5 classes")
    parser.add_argument("--blocks", type=int, default=6, help="blocks per setting (alternating)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per block")
    args = parser.parse_args(argv)
    for size in (int(s) for s in args.sizes.split(",")):
        for condition, action in anatomy.conditions()[:2]:  # back to back; after a write
            print(line(size, condition, measure(size, condition, action, args.blocks,
                                                args.steps)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
