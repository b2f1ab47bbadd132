"""Timing of benchmark groups: every path on one set of inputs, interleaved round by round,
with the memory-bandwidth floor measured in the same rounds.

Interleaving (round r runs every entry once, the start rotating each round) spreads the
noise of a shared machine evenly over the paths, so the ratios between them stay meaningful
even when the absolute times drift. Times are wall-clock medians over the rounds.

The floor is a copy of a float32 array with as many elements as the logits into a
preallocated array of the same size (NumPy copyto, i.e. memcpy): it reads and writes every
byte once and does nothing else, so its bandwidth, 2 * nbytes / time, is the rate at which
this machine moves data. Not tf.identity (it returns the same buffer, no copy) and not a TF
element-wise op (each call allocates and first-touches a fresh output, which adds page-fault
time that is not bandwidth; it is still measured and reported as "tf_new_tensor" for
context). The copy runs on 1 thread and split over 2 threads, once per round; the fastest
copy seen counts (noise only ever slows a copy down), so the floor is the strictest one this
machine shows, while the paths are reported by their median.
"""
import time
from concurrent.futures import ThreadPoolExecutor
from typing import List, NamedTuple, Optional

import numpy as np

from . import _bench_paths as bp


class Entry(NamedTuple):
    path: str
    direction: str
    shape: Optional[bp.CaseShape] = None  # None: the group's shape (same element count)


class Timed(NamedTuple):
    path: str
    label: str
    direction: str
    shape: bp.CaseShape
    median_s: float
    min_s: float
    rounds: int
    first_call_s: float          # includes tracing / XLA compilation
    custom_calls: Optional[list]  # XLA paths: custom-call targets in the compiled HLO


class Floor(NamedTuple):
    elements: int
    copy_bytes: int              # bytes read + written by one copy
    numpy_1thread_s: float       # fastest of the rounds
    numpy_2threads_s: float
    tf_new_tensor_s: float

    @property
    def bandwidth(self):
        """Bytes per second moved by the faster NumPy copy (read + write counted)."""
        return self.copy_bytes / min(self.numpy_1thread_s, self.numpy_2threads_s)

    def seconds_for(self, nbytes):
        return nbytes / self.bandwidth


class _FloorProbe:
    """The copy kernels timed alongside the paths."""

    def __init__(self, elements):
        import tensorflow as tf

        self.elements = elements
        self.src = np.random.default_rng(1).random(elements, dtype=np.float32)
        self.dst = np.empty_like(self.src)
        self.dst[:] = 0.0  # first-touch now, not inside the timed copy
        half = elements // 2
        self.halves = [slice(0, half), slice(half, elements)]
        self.pool = ThreadPoolExecutor(2)
        self.tf_src = tf.constant(self.src)
        self.tf_one = tf.constant(1.0)
        self.times = {"numpy_1thread": [], "numpy_2threads": [], "tf_new_tensor": []}

    def _copy_2threads(self):
        # np.copyto releases the GIL for plain dtypes, so the halves copy in parallel.
        list(self.pool.map(lambda s: np.copyto(self.dst[s], self.src[s]), self.halves))

    def _tf_new_tensor(self):
        import tensorflow as tf

        # Eager CPU ops return after the result is written; the input stays referenced, so TF
        # cannot reuse its buffer and must allocate and write a new tensor.
        tf.math.multiply(self.tf_src, self.tf_one)

    def run_once(self):
        for name, fn in (("numpy_1thread", lambda: np.copyto(self.dst, self.src)),
                         ("numpy_2threads", self._copy_2threads),
                         ("tf_new_tensor", self._tf_new_tensor)):
            t0 = time.perf_counter()
            fn()
            self.times[name].append(time.perf_counter() - t0)

    def result(self):
        self.pool.shutdown()
        best = {k: float(np.min(v)) for k, v in self.times.items()}
        return Floor(self.elements, 2 * self.src.nbytes, best["numpy_1thread"],
                     best["numpy_2threads"], best["tf_new_tensor"])


class _Prepared(NamedTuple):
    entry: Entry
    label: str
    step: object
    first_call_s: float
    warm_call_s: float
    custom_calls: Optional[list]
    shape: bp.CaseShape
    inputs: tuple


def _timed_call(step, inputs):
    t0 = time.perf_counter()
    bp.run_step(step, inputs)
    return time.perf_counter() - t0


def time_group(shape: bp.CaseShape, entries: List[Entry], min_rounds=3, max_rounds=30,
               budget_s=12.0, log=print):
    """Times every entry (on the group's inputs, or on its own shape's: a layout or dtype
    variant of the same size, so that their ratio comes from the same rounds); returns
    ([Timed], Floor)."""
    inputs_by_shape = {}
    prepared = []
    for entry in entries:
        entry_shape = entry.shape or shape
        if entry_shape not in inputs_by_shape:
            inputs_by_shape[entry_shape] = bp.make_inputs(entry_shape)
        inputs = inputs_by_shape[entry_shape]
        spec = bp.PATHS[entry.path]
        step = bp.make_step(spec, entry.direction, entry_shape.layout)
        first = _timed_call(step, inputs)
        warm = _timed_call(step, inputs)
        calls = bp.compiled_custom_calls(step, inputs) if spec.mode == "xla" else None
        label = bp.xla_label(spec, calls) if spec.mode == "xla" else spec.label
        prepared.append(_Prepared(entry, label, step, first, warm, calls, entry_shape, inputs))
    floor = _FloorProbe(shape.elements)
    floor.run_once()
    round_s = sum(p.warm_call_s for p in prepared) + 1e-9
    rounds = int(max(min_rounds, min(max_rounds, budget_s // round_s)))
    log(f"  {shape.describe()}: {len(entries)} entries, {rounds} rounds of ~{round_s:.2f} s")
    times = [[] for _ in prepared]
    for r in range(rounds):
        order = list(range(len(prepared)))
        order = order[r % len(order):] + order[:r % len(order)]
        for i in order:
            times[i].append(_timed_call(prepared[i].step, prepared[i].inputs))
        floor.run_once()
    results = [Timed(p.entry.path, p.label, p.entry.direction, p.shape, float(np.median(t)),
                     float(np.min(t)), len(t), p.first_call_s, p.custom_calls)
               for p, t in zip(prepared, times)]
    return results, floor.result()
