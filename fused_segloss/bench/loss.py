"""Loss section: forward+backward of one loss step on every path, interleaved round by round.

Every path computes sigmoid cross-entropy + per-class soft Dice (seg_loss's defaults) and
its gradient dLoss/dlogits on the same float32 inputs, inside a tf.function (the step Keras
`fit` runs). A round calls every row once, the first row rotating from round to round, so
a shared machine's drift falls on all rows alike; a row's time is its median over the
rounds, and its ratio to the fused row comes from those same rounds. The bytes-moved floor
is a memory copy reading and writing as many bytes as the fused passes must move (forward:
read logits and labels; backward: read both again, write the gradient; 20 bytes per
float32 element), split over the usable CPUs like TF's kernels and timed in the same
rounds: no loss step can be faster than moving its data once.
"""
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np

BYTES_PER_ELEMENT = 20
FUSED = "fused (tf.function)"
FLOOR = "bytes-moved floor"
PATHS = {  # row label -> (loss, jit_compile)
    FUSED: ("fused", False),
    "hand-written TF (tf.function)": ("plain", False),
    "hand-written TF (XLA)": ("plain", True),
    "reference (tf.function)": ("reference", False),
}


class Shape(NamedTuple):
    batch: int
    size: int  # height = width
    classes: int
    data_format: str = "channels_last"

    @property
    def elements(self):
        return self.batch * self.size * self.size * self.classes

    def logits_shape(self):
        b, s, c = self.batch, self.size, self.classes
        return (b, s, s, c) if self.data_format == "channels_last" else (b, c, s, s)


def plain_bce_dice(logits, labels, data_format="channels_last", smooth=1e-5):
    """BCE + soft Dice as commonly written by hand in TensorFlow: float32, Dice per class
    over the batch, mean over classes (seg_loss's defaults)."""
    import tensorflow as tf

    x, z = tf.cast(logits, tf.float32), tf.cast(labels, tf.float32)
    class_axis = len(x.shape) - 1 if data_format == "channels_last" else 1
    axes = [a for a in range(len(x.shape)) if a != class_axis]
    ce = tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(labels=z, logits=x))
    p = tf.sigmoid(x)
    intersection = tf.reduce_sum(p * z, axis=axes)
    denominator = tf.reduce_sum(p, axis=axes) + tf.reduce_sum(z, axis=axes)
    dice = (2.0 * intersection + smooth) / (denominator + smooth)
    return ce + (1.0 - tf.reduce_mean(dice))


def make_inputs(shape: Shape, seed=0):
    """(logits, labels) float32 tensors: N(0, 2) logits, ~30% positive labels."""
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    logits = 2.0 * rng.standard_normal(shape.logits_shape(), dtype=np.float32)
    labels = (rng.random(shape.logits_shape(), dtype=np.float32) < 0.3).astype(np.float32)
    return tf.constant(logits), tf.constant(labels)


def make_step(label, data_format):
    """call(logits, labels) -> (loss as a float, dLoss/dlogits) for a row of PATHS; reading
    the loss back guards against deferred work."""
    import tensorflow as tf

    import fused_segloss as fsl

    family, jit = PATHS[label]

    def step(x, z):
        with tf.GradientTape() as tape:
            tape.watch(x)
            if family == "plain":
                loss = plain_bce_dice(x, z, data_format)
            else:
                loss = fsl.seg_loss(x, z, data_format=data_format, implementation=family)
        return loss, tape.gradient(loss, x)
    step = tf.function(step, jit_compile=jit, autograph=False)

    def call(x, z):
        loss, grad = step(x, z)
        return float(loss.numpy()), grad
    return call


class Floor:
    """A copy that reads and writes BYTES_PER_ELEMENT bytes per element, over all CPUs."""

    def __init__(self, elements):
        count = elements * BYTES_PER_ELEMENT // 8  # float32: 4 bytes read + 4 written each
        self.src = np.random.default_rng(1).random(count, dtype=np.float32)
        self.dst = np.zeros_like(self.src)  # written once now: no page faults when timed
        threads = len(os.sched_getaffinity(0))
        bounds = np.linspace(0, count, threads + 1).astype(int)
        self.parts = [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]
        self.pool = ThreadPoolExecutor(threads)

    def __call__(self):
        # np.copyto releases the GIL, so the parts copy in parallel.
        list(self.pool.map(lambda s: np.copyto(self.dst[s], self.src[s]), self.parts))


def _seconds(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - start, out


def measure(shape: Shape, rounds=(5, 30), budget_s=30.0, with_fused=True, log=print):
    """{row label: {median_ms, min_ms, first_call_ms, loss}} in table order, and the
    number of rounds: as many as fit in budget_s, within the bounds `rounds`."""
    inputs = make_inputs(shape)
    calls, rows = {}, {}
    for label in PATHS:
        if label == FUSED and not with_fused:
            rows[label] = {"note": "  unavailable: the compiled library is not loaded"}
            continue
        step = make_step(label, shape.data_format)
        first_s, (loss, _) = _seconds(step, *inputs)  # traces and compiles
        calls[label] = lambda step=step: step(*inputs)
        rows[label] = {"first_call_ms": first_s * 1e3, "loss": loss}
    calls[FLOOR] = floor = Floor(shape.elements)
    rows[FLOOR] = {"bytes_moved": shape.elements * BYTES_PER_ELEMENT}
    round_s = sum(_seconds(call)[0] for call in calls.values())
    count = int(min(rounds[1], max(rounds[0], budget_s // max(round_s, 1e-9))))
    log(f"  {count} rounds of ~{round_s:.2f} s")
    names, times = list(calls), {name: [] for name in calls}
    for r in range(count):
        for name in names[r % len(names):] + names[:r % len(names)]:
            times[name].append(_seconds(calls[name])[0])
    floor.pool.shutdown()
    for name, seconds in times.items():
        rows[name].update(median_ms=float(np.median(seconds)) * 1e3,
                          min_ms=float(np.min(seconds)) * 1e3)
    return rows, count
