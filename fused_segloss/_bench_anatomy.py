"""Where one eager fused forward+backward step spends its time (the bench's "anatomy").

The step is the bench's `fused` fwd_bwd step (seg_loss under a GradientTape, then
tape.gradient). Timestamps are taken around the two ops and the compiled `combine` call of
fused_segloss/_eager_fused.py, by wrapping them for the duration of the measurement, so
every interval between two timestamps is either one of those calls or framework and Python
work around them (argument checks, the tape). Each interval is reported as its median over
the steps; the kernels' intervals include their op dispatch and output allocation.

The same step is also timed under conditions (measure_conditions): back to back, right after
writing a buffer larger than the caches, and right after the process idled. A training loop
runs the model between two loss calls, so the loss never starts as warm as back to back;
the table shows which phases grow, which is the fixed per-step cost that makes time per
element fall with image size (the linearity target).
"""
import time
from typing import Callable, List, NamedTuple, Optional

import numpy as np

from . import _bench_paths as bp

# (name of the interval, the mark that ends it); the first interval starts at the step.
INTERVALS = (
    ("checks and dispatch before the stats op", "stats call"),
    ("stats op (forward pass)", "stats done"),
    ("combine + Jacobian (one compiled call)", "combine done"),
    ("recording, tape.gradient, until the gradient op", "grad call"),
    ("gradient op (backward pass)", "grad done"),
    ("tape.gradient returns, loss read", "end"),
)
SHORT_NAMES = ("checks", "stats op", "combine", "to grad", "grad op", "return")
_OPS = {"fused_segloss_stats": "stats", "fused_segloss_stats_grad": "grad",
        "fused_segloss_stats_with_label_bytes": "stats",
        "fused_segloss_stats_grad_with_label_bytes": "grad"}


class Anatomy(NamedTuple):
    shape: bp.CaseShape
    steps: int
    step_ms: float                # median of the whole step
    intervals_ms: List[tuple]     # (name, median ms), in step order
    outside_ms: float             # median over the steps of (step - the two ops' intervals)


class _Marked:
    """ops.library() whose two ops append (mark, time) before and after each call."""

    def __init__(self, library, marks):
        self._library, self._marks = library, marks

    def __getattr__(self, name):
        op = getattr(self._library, name)
        if name not in _OPS:
            return op

        def marked(*args, **kwargs):
            self._marks.append((_OPS[name] + " call", time.perf_counter()))
            out = op(*args, **kwargs)
            self._marks.append((_OPS[name] + " done", time.perf_counter()))
            return out
        return marked


def measure(shape: bp.CaseShape, steps: int, warmup: int = 3,
            before_step: Optional[Callable[[], None]] = None) -> Anatomy:
    """The step's phases; `before_step`, if given, runs before every step, outside its time."""
    import fused_segloss
    import tensorflow as tf

    from . import _eager_fused, ops

    if not _eager_fused.applicable({}):
        raise RuntimeError("the eager fused path is not available here (op library missing?)")
    x, z, w = bp.make_inputs(shape)
    marks = []
    library, get_jacobian = ops.library, _eager_fused._Traced.combine_with_jacobian

    def marked_jacobian(traced):
        combine = get_jacobian(traced)

        def call(*args):
            out = combine(*args)
            marks.append(("combine done", time.perf_counter()))
            return out
        return call

    marked_library = _Marked(library(), marks)
    _eager_fused.ops.library = lambda: marked_library
    _eager_fused._Traced.combine_with_jacobian = marked_jacobian
    try:
        durations, totals, outside = [], [], []
        for i in range(warmup + steps):
            if before_step is not None:
                before_step()
            marks.clear()
            start = time.perf_counter()
            with tf.GradientTape() as tape:
                tape.watch(x)
                loss = fused_segloss.seg_loss(x, z, w, data_format=shape.layout)
            tape.gradient(loss, x)
            loss.numpy()
            marks.append(("end", time.perf_counter()))
            if i < warmup:
                continue
            at = dict(marks)
            if len(at) != len(marks) or set(at) != {m for _, m in INTERVALS}:
                raise RuntimeError(f"unexpected call sequence in the eager step: {marks}")
            ends = [at[m] for _, m in INTERVALS]
            durations.append(np.diff([start] + ends))
            totals.append(ends[-1] - start)
            outside.append(totals[-1] - sum(d for (name, _), d in zip(INTERVALS, durations[-1])
                                            if "op (" in name))
    finally:
        _eager_fused.ops.library = library
        _eager_fused._Traced.combine_with_jacobian = get_jacobian
    medians = np.median(np.array(durations), axis=0) * 1e3
    return Anatomy(shape, steps, float(np.median(totals) * 1e3),
                   [(name, float(ms)) for (name, _), ms in zip(INTERVALS, medians)],
                   float(np.median(outside) * 1e3))


def as_json(anatomy: Anatomy) -> dict:
    """The bench JSON's record of one anatomy (its shape is recorded by the caller)."""
    return {"steps": anatomy.steps, "step_ms": anatomy.step_ms,
            "outside_ms": anatomy.outside_ms, "intervals_ms": dict(anatomy.intervals_ms)}


def table(anatomy: Anatomy) -> str:
    lines = [f"Anatomy of one eager fused forward+backward step, {anatomy.shape.describe()} "
             f"(medians of {anatomy.steps} steps; whole step {anatomy.step_ms:.2f} ms, of "
             f"which {anatomy.outside_ms:.2f} ms outside the two ops)"]
    for name, ms in anatomy.intervals_ms:
        lines.append(f"  {name:<50}{ms:>8.3f} ms")
    return "\n".join(lines)


class _WriteBuffer:
    """A NumPy copy (memcpy) of `mib` MiB into a second buffer of that size."""

    def __init__(self, mib: int):
        self.source = np.ones(mib << 18, np.float32)  # 2^18 float32 per MiB
        self.target = np.zeros_like(self.source)

    def __call__(self):
        np.copyto(self.target, self.source)


def conditions(write_mib: int = 256, idle_s: float = 0.2):
    """(name, action run before each step): back to back; after a copy of write_mib MiB
    (more than the L2 and a shared L3 hold: the step's inputs and code are evicted, as by a
    model's layers); after idle_s of sleep (pool threads parked, the vCPUs idle)."""
    return [("back to back", None),
            (f"after writing {write_mib} MiB", _WriteBuffer(write_mib)),
            (f"after {idle_s:g} s idle", lambda: time.sleep(idle_s))]


class ConditionAnatomy(NamedTuple):
    condition: str
    anatomy: Anatomy


def measure_conditions(shapes, steps: int, write_mib: int = 256,
                       idle_s: float = 0.2) -> List[ConditionAnatomy]:
    """measure() of each shape under each condition (shape by shape, conditions in order)."""
    out = []
    for shape in shapes:
        for name, action in conditions(write_mib, idle_s):
            out.append(ConditionAnatomy(name, measure(shape, steps, before_step=action)))
    return out


def conditions_table(results: List[ConditionAnatomy]) -> str:
    steps = sorted({r.anatomy.steps for r in results})
    lines = [f"Anatomy under conditions: the same eager step, each step run right after the "
             f"condition (medians of {'/'.join(map(str, steps))} steps, ms; 'outside' = the "
             f"median of each step's time outside the two ops)",
             f"{'size':<7}{'condition':<26}{'step':>8}" + "".join(f"{n:>9}" for n in SHORT_NAMES)
             + f"{'outside':>9}{'ns/elem':>9}"]
    per_element = {}
    for r in results:
        a = r.anatomy
        per_element.setdefault(r.condition, []).append(a.step_ms * 1e6 / a.shape.elements)
        lines.append(f"{str(a.shape.size) + '²':<7}{r.condition:<26}{a.step_ms:>8.2f}"
                     + "".join(f"{ms:>9.3f}" for _, ms in a.intervals_ms)
                     + f"{a.outside_ms:>9.2f}{per_element[r.condition][-1]:>9.3f}")
    sizes = sorted({r.anatomy.shape.size for r in results})
    if len(sizes) >= 2:  # context for the linearity target: the same ratio, per condition
        lines.append(f"time/element spread (max/min) over {', '.join(f'{s}²' for s in sizes)}: "
                     + "; ".join(f"{c} {max(v) / min(v):.2f}" for c, v in per_element.items()))
    return "\n".join(lines)
