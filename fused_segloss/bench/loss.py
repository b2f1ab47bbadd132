"""Loss section: forward+backward of one loss step on every path, interleaved round by round.

Every path computes cross-entropy + per-class soft Dice and its gradient dLoss/dlogits on
the same float32 logits, inside a tf.function (the step Keras `fit` runs): sigmoid with
float32 0/1 labels, or softmax with uint8 class ids (Shape.activation); with a focal_gamma,
the focal cross-entropy, and the plain fused loss as an extra row. A round calls every row
once, the first row rotating from round to round, so a shared machine's drift falls on all
rows alike; a row's time is its median over the rounds, and its ratio to the fused row
comes from those same rounds. The bytes-moved floor is a memory copy reading and writing
as many bytes as the fused passes must move (forward: read logits and labels; backward:
read both again, write the gradient: 20 bytes per element with float32 labels, 12 per
element + 2 per pixel with uint8 class ids), split over the usable CPUs like TF's kernels
and timed in the same rounds: no loss step can be faster than moving its data once.
"""
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np

FUSED = "fused (tf.function)"
FUSED_PLAIN = "fused, focal_gamma=0 (tf.function)"
FLOOR = "bytes-moved floor"
PATHS = {  # row label -> (loss, jit_compile)
    FUSED: ("fused", False),
    FUSED_PLAIN: ("fused-plain", False),  # only with a focal_gamma
    "hand-written TF (tf.function)": ("plain", False),
    "hand-written TF (XLA)": ("plain", True),
    "reference (tf.function)": ("reference", False),
}


class Shape(NamedTuple):
    batch: int
    size: int  # height = width
    classes: int
    data_format: str = "channels_last"
    activation: str = "sigmoid"
    focal_gamma: float = 0.0

    @property
    def elements(self):
        return self.batch * self.size * self.size * self.classes

    @property
    def bytes_moved(self):
        """What the fused passes must read and write (module docstring)."""
        if self.activation == "softmax":
            return 12 * self.elements + 2 * self.batch * self.size * self.size
        return 20 * self.elements

    def paths(self):
        return [p for p in PATHS if p != FUSED_PLAIN or self.focal_gamma]

    def logits_shape(self):
        b, s, c = self.batch, self.size, self.classes
        return (b, s, s, c) if self.data_format == "channels_last" else (b, c, s, s)


def plain_loss(logits, labels, shape, smooth=1e-5):
    """CE + soft Dice as commonly written by hand in TensorFlow: float32, Dice per class
    over the batch, mean over classes (seg_loss's defaults). Sigmoid: BCE (Keras'
    BinaryFocalCrossentropy with a focal_gamma); softmax: sparse softmax CE (Keras'
    CategoricalFocalCrossentropy on tf.one_hot with a focal_gamma) and tf.one_hot labels."""
    import keras
    import tensorflow as tf

    x = tf.cast(logits, tf.float32)
    class_axis = len(x.shape) - 1 if shape.data_format == "channels_last" else 1
    axes = [a for a in range(len(x.shape)) if a != class_axis]
    gamma = shape.focal_gamma
    if shape.activation == "softmax":
        ids = tf.cast(labels, tf.int32)
        z = tf.one_hot(ids, shape.classes, axis=class_axis)
        if gamma:
            ce = keras.losses.CategoricalFocalCrossentropy(
                from_logits=True, alpha=1.0, gamma=gamma, axis=class_axis)(z, x)
        else:
            last = x if class_axis == len(x.shape) - 1 else tf.transpose(x, [0, 2, 3, 1])
            ce = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(ids, last))
        p = tf.nn.softmax(x, axis=class_axis)
    else:
        z = tf.cast(labels, tf.float32)
        if gamma:
            ce = keras.losses.BinaryFocalCrossentropy(from_logits=True, gamma=gamma)(z, x)
        else:
            ce = tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(labels=z, logits=x))
        p = tf.sigmoid(x)
    intersection = tf.reduce_sum(p * z, axis=axes)
    denominator = tf.reduce_sum(p, axis=axes) + tf.reduce_sum(z, axis=axes)
    dice = (2.0 * intersection + smooth) / (denominator + smooth)
    return ce + (1.0 - tf.reduce_mean(dice))


def make_inputs(shape: Shape, seed=0):
    """(logits, labels) tensors: N(0, 2) float32 logits; float32 labels ~30% positive
    (sigmoid) or uniform uint8 class ids [B, H, W] (softmax)."""
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    logits = 2.0 * rng.standard_normal(shape.logits_shape(), dtype=np.float32)
    if shape.activation == "softmax":
        labels = rng.integers(0, shape.classes, (shape.batch, shape.size, shape.size), np.uint8)
    else:
        labels = (rng.random(shape.logits_shape(), dtype=np.float32) < 0.3).astype(np.float32)
    return tf.constant(logits), tf.constant(labels)


def fused_options(shape: Shape):
    """seg_loss's keyword arguments for the shape's loss."""
    return {"data_format": shape.data_format, "activation": shape.activation,
            "focal_gamma": shape.focal_gamma}


def make_step(label, shape):
    """call(logits, labels) -> (loss as a float, dLoss/dlogits) for a row of PATHS; reading
    the loss back guards against deferred work."""
    import tensorflow as tf

    import fused_segloss as fsl

    family, jit = PATHS[label]

    def step(x, z):
        with tf.GradientTape() as tape:
            tape.watch(x)
            if family == "plain":
                loss = plain_loss(x, z, shape)
            else:
                options = fused_options(shape)
                if family == "fused-plain":
                    options["focal_gamma"] = 0.0
                loss = fsl.seg_loss(x, z, implementation=family.split("-")[0], **options)
        return loss, tape.gradient(loss, x)
    step = tf.function(step, jit_compile=jit, autograph=False)

    def call(x, z):
        loss, grad = step(x, z)
        return float(loss.numpy()), grad
    return call


class Floor:
    """A copy that reads and writes `bytes_moved` bytes in all, over all CPUs."""

    def __init__(self, bytes_moved):
        count = bytes_moved // 8  # float32: 4 bytes read + 4 written each
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
    for label in shape.paths():
        if label in (FUSED, FUSED_PLAIN) and not with_fused:
            rows[label] = {"note": "  unavailable: the compiled library is not loaded"}
            continue
        step = make_step(label, shape)
        first_s, (loss, _) = _seconds(step, *inputs)  # traces and compiles
        calls[label] = lambda step=step: step(*inputs)
        rows[label] = {"first_call_ms": first_s * 1e3, "loss": loss}
    calls[FLOOR] = floor = Floor(shape.bytes_moved)
    rows[FLOOR] = {"bytes_moved": shape.bytes_moved}
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
