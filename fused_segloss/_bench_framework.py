"""TensorFlow's own fixed cost per step: its smallest GradientTape step, under the anatomy's
conditions (the bench's "framework floor").

Why: the linearity target asks time per element to stay within 15% from 256² to 1024², so
whatever a step costs regardless of its size must stay under about 15% of the 256² step.
The anatomy (_bench_anatomy) shows how much of the fused step lies outside its two ops; this
measures what TensorFlow itself costs per step. The smallest step is the sum of a
[B, C, 8] tensor (the size of the fused op's statistics) and its gradient through a
GradientTape: one op forward, TF's two-op gradient of a sum (a reshape and a tile)
backward, against the fused step's op, `combine` call and gradient op. It runs eagerly, as
a tf.function and XLA-compiled (jit_compile=True), each right after the same conditions as
the anatomy's (_bench_anatomy.conditions: back to back, after writing a buffer larger than
the caches, after idling). From the eager one and the anatomy's largest size,
`spread_estimates` gives the time/element spread of an eager step whose only fixed cost
is that smallest step: see its docstring.
"""
import time
from typing import Dict, List, NamedTuple

import numpy as np

from . import _bench_anatomy

MODES = ("eager", "tf.function", "XLA")


class SmallestStep(NamedTuple):
    mode: str
    condition: str
    steps: int
    median_ms: float


def smallest_step(mode: str, batch: int, classes: int):
    """step() -> (y, dy/ds) of y = sum(s) for a [batch, classes, 8] float32 s, run to
    completion (the scalar read back, as the bench's steps do)."""
    import tensorflow as tf

    s = tf.constant(np.linspace(-1.0, 1.0, batch * classes * 8, dtype=np.float32)
                    .reshape(batch, classes, 8))

    def body(t):
        with tf.GradientTape() as tape:
            tape.watch(t)
            y = tf.reduce_sum(t)
        return y, tape.gradient(y, t)

    if mode == "eager":
        fn = body
    elif mode in ("tf.function", "XLA"):
        fn = tf.function(body, autograph=False, jit_compile=mode == "XLA")
    else:
        raise ValueError(f"`mode` must be one of {MODES}, got {mode!r}")

    def step():
        y, grad = fn(s)
        y.numpy()
        return y, grad
    return step


def measure(batch: int, classes: int, steps: int, warmup: int = 3, write_mib: int = 256,
            idle_s: float = 0.2) -> List[SmallestStep]:
    """The median of `steps` timed steps of each mode under each condition (the condition's
    action runs before every step, outside its time, as in _bench_anatomy.measure)."""
    out = []
    for mode in MODES:
        step = smallest_step(mode, batch, classes)
        for name, action in _bench_anatomy.conditions(write_mib, idle_s):
            times = []
            for i in range(warmup + steps):
                if action is not None:
                    action()
                start = time.perf_counter()
                step()
                if i >= warmup:
                    times.append(time.perf_counter() - start)
            out.append(SmallestStep(mode, name, steps, float(np.median(times) * 1e3)))
    return out


def spread_estimates(conditions: List[_bench_anatomy.ConditionAnatomy],
                     smallest: List[SmallestStep]) -> Dict[str, float]:
    """Per condition, 1 + (eager smallest step) / (the smallest anatomy size's elements x the
    largest size's time per element): the time/element spread between those two sizes of an
    eager step whose passes cost exactly the largest size's time per element and whose only
    fixed cost is TF's smallest eager step. An estimate that errs low: the largest size's
    time per element still holds that size's share of the fixed cost. Not a bound: the two
    steps run different framework work (back to back on Zen 3, the eager smallest step took
    0.65-0.87 ms and the whole fused step on 8x8x8x5 inputs 0.70-1.00 ms, medians of 200
    steps in two rounds). Empty when the anatomy ran at fewer than two sizes."""
    eager = {s.condition: s.median_ms for s in smallest if s.mode == "eager"}
    estimates = {}
    for condition in eager:
        runs = sorted((c.anatomy for c in conditions if c.condition == condition),
                      key=lambda a: a.shape.elements)
        if len(runs) < 2 or runs[0].shape.elements == runs[-1].shape.elements:
            continue
        ms_per_element = runs[-1].step_ms / runs[-1].shape.elements
        estimates[condition] = 1.0 + eager[condition] / (ms_per_element * runs[0].shape.elements)
    return estimates


def table(smallest: List[SmallestStep], conditions: List[_bench_anatomy.ConditionAnatomy],
          batch: int, classes: int) -> str:
    names = list(dict.fromkeys(s.condition for s in smallest))
    steps = sorted({s.steps for s in smallest})
    lines = [f"TensorFlow's smallest step under the same conditions: sum(s) and its gradient "
             f"through a GradientTape, s of shape [{batch}, {classes}, 8] (medians of "
             f"{'/'.join(map(str, steps))} steps, ms)",
             f"{'mode':<13}" + "".join(f"{n:>26}" for n in names)]
    by_key = {(s.mode, s.condition): s.median_ms for s in smallest}
    for mode in MODES:
        if any(key[0] == mode for key in by_key):
            lines.append(f"{mode:<13}" + "".join(f"{by_key.get((mode, n), float('nan')):>26.3f}"
                                                 for n in names))
    estimates = spread_estimates(conditions, smallest)
    if estimates:
        sizes = sorted({c.anatomy.shape.size for c in conditions})
        lines.append(f"time/element spread {sizes[0]}²-{sizes[-1]}² of an eager step with only "
                     f"the eager smallest step as fixed cost (_bench_framework.spread_estimates): "
                     + "; ".join(f"{c} {e:.2f}" for c, e in estimates.items()))
    return "\n".join(lines)


def as_json(smallest: List[SmallestStep]) -> list:
    return [s._asdict() for s in smallest]
