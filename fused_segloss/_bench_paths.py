"""The code paths the benchmarks compare, the inputs they run on, and the bytes they must move.

Shared by `python -m fused_segloss bench` (fused_segloss/bench.py), the fresh-process memory
probe (_bench_memory.py) and the pytest-benchmark suite (benchmarks/). Every path computes the
same loss: sigmoid cross-entropy + soft Dice (fused_segloss.seg_loss's defaults), either forward
only ("fwd": the scalar loss) or forward and backward ("fwd_bwd": the loss and dLoss/dlogits).
"""
import re
from typing import Callable, NamedTuple, Optional

import numpy as np

DIRECTIONS = ("fwd", "fwd_bwd")
LAYOUTS = ("channels_last", "channels_first")
LOGIT_DTYPES = ("float32", "bfloat16", "float16")
LABEL_DTYPES = ("float32", "uint8")
_ITEMSIZE = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2, "uint8": 1, "bool": 1}


class PathSpec(NamedTuple):
    name: str          # stable id used on the command line and in the JSON
    label: str         # what the table prints
    family: str        # "fused", "reference" (fused_segloss.reference) or "plain" (user-written TF)
    mode: str          # "eager", "function" (tf.function) or "xla" (tf.function(jit_compile=True))
    implementation: Optional[str]  # seg_loss's implementation= for the fused_segloss families
    label_bytes: bool = True  # False: with fused_segloss.ops.label_bytes_enabled off


PATHS = {p.name: p for p in (
    PathSpec("fused", "fused (eager)", "fused", "eager", "fused"),
    PathSpec("fused_function", "fused (tf.function)", "fused", "function", "fused"),
    PathSpec("reference", "reference (eager)", "reference", "eager", "reference"),
    PathSpec("reference_function", "reference (tf.function)", "reference", "function", "reference"),
    PathSpec("reference_xla", "reference (XLA jit_compile)", "reference", "xla", "reference"),
    # The fused eager step without the label bytes (ops.py): their effect, in the same rounds.
    # Placed after a heavy path, as "fused" is (after plain_xla): each path of a round runs
    # right after the one listed before it, and right after the fused step itself it would
    # find the caches and TF's runtime warm (0.2-0.4 ms less at 64²-256² in a run that
    # placed it there).
    PathSpec("fused_no_label_bytes", "fused (eager, no label bytes)", "fused", "eager", "fused",
             label_bytes=False),
    # seg_loss's own choice inside XLA: the FFI custom call once it exists, else the reference.
    # Its label is decided from the compiled HLO (see xla_auto_label).
    PathSpec("xla_auto", "xla (auto)", "fused", "xla", "auto"),
    PathSpec("plain", "plain TF BCE+Dice (eager)", "plain", "eager", None),
    PathSpec("plain_function", "plain TF BCE+Dice (tf.function)", "plain", "function", None),
    PathSpec("plain_xla", "plain TF BCE+Dice (XLA)", "plain", "xla", None),
)}


class CaseShape(NamedTuple):
    batch: int
    size: int          # height = width
    classes: int
    layout: str = "channels_last"
    logits_dtype: str = "float32"
    labels_dtype: str = "float32"
    weights: bool = False  # a per-pixel float32 weight map [B, H, W, 1] ([B, 1, H, W] first)

    @property
    def elements(self):
        return self.batch * self.size * self.size * self.classes

    def logits_shape(self):
        b, s, c = self.batch, self.size, self.classes
        return (b, s, s, c) if self.layout == "channels_last" else (b, c, s, s)

    def weights_shape(self):
        b, s = self.batch, self.size
        return (b, s, s, 1) if self.layout == "channels_last" else (b, 1, s, s)

    def describe(self):
        text = (f"{self.batch}x{self.size}x{self.size}x{self.classes} {self.layout} "
                f"logits={self.logits_dtype} labels={self.labels_dtype}")
        return text + (" +weights" if self.weights else "")


def logits_bytes(shape: CaseShape):
    return shape.elements * _ITEMSIZE[shape.logits_dtype]


def min_bytes_moved(shape: CaseShape, direction: str):
    """The least memory traffic any implementation needs, in bytes.

    The forward reads logits, labels and the weight map once. The backward reads them again
    (the gradient needs the per-element values, and they do not fit in cache at the sizes of
    interest) and writes the gradient in the logits' dtype once. float32 logits and labels,
    no weights: 8 B/element forward, 20 B/element forward+backward.
    """
    pixels = shape.batch * shape.size * shape.size
    read_once = (shape.elements * (_ITEMSIZE[shape.logits_dtype] + _ITEMSIZE[shape.labels_dtype])
                 + (pixels * 4 if shape.weights else 0))
    if direction == "fwd":
        return read_once
    if direction == "fwd_bwd":
        return 2 * read_once + logits_bytes(shape)
    raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")


def make_inputs(shape: CaseShape, seed=0):
    """(logits, labels, weights or None) as TF tensors: N(0, 2) logits, ~30% positive labels,
    weights in [0, 1) with ~10% exact zeros (ignored pixels)."""
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    logits = rng.standard_normal(shape.logits_shape(), dtype=np.float32)
    logits *= 2.0
    positive = rng.random(shape.logits_shape(), dtype=np.float32) < 0.3
    logits_t = tf.cast(tf.constant(logits), shape.logits_dtype)
    labels_t = tf.constant(positive.astype(shape.labels_dtype))
    weights_t = None
    if shape.weights:
        w = rng.random(shape.weights_shape(), dtype=np.float32)
        w[w < 0.1] = 0.0
        weights_t = tf.constant(w)
    return logits_t, labels_t, weights_t


def plain_bce_dice(logits, labels, weights=None, data_format="channels_last", smooth=1e-5):
    """BCE + soft Dice the way it is commonly written by hand in TensorFlow today.

    Computed in float32 (as mixed-precision guides recommend for losses); batch Dice per
    class, mean over classes, like seg_loss's defaults.
    """
    import tensorflow as tf

    x = tf.cast(logits, tf.float32)
    z = tf.cast(labels, tf.float32)
    rank = len(x.shape)
    class_axis = rank - 1 if data_format == "channels_last" else 1
    reduce_axes = [a for a in range(rank) if a != class_axis]
    bce = tf.nn.sigmoid_cross_entropy_with_logits(labels=z, logits=x)
    p = tf.sigmoid(x)
    if weights is None:
        ce = tf.reduce_mean(bce)
        intersection = tf.reduce_sum(p * z, axis=reduce_axes)
        denominator = tf.reduce_sum(p, axis=reduce_axes) + tf.reduce_sum(z, axis=reduce_axes)
    else:
        w = tf.cast(weights, tf.float32)
        ce = tf.reduce_sum(w * bce) / tf.reduce_sum(w * tf.ones_like(x))
        intersection = tf.reduce_sum(w * p * z, axis=reduce_axes)
        denominator = (tf.reduce_sum(w * p, axis=reduce_axes)
                       + tf.reduce_sum(w * z, axis=reduce_axes))
    dice = (2.0 * intersection + smooth) / (denominator + smooth)
    return ce + (1.0 - tf.reduce_mean(dice))


def _loss_function(spec: PathSpec, data_format):
    if spec.family == "plain":
        return lambda x, z, w: plain_bce_dice(x, z, w, data_format=data_format)
    import fused_segloss
    from fused_segloss import ops

    def loss(x, z, w):
        return fused_segloss.seg_loss(x, z, w, data_format=data_format,
                                      implementation=spec.implementation)
    if spec.label_bytes:
        return loss

    def loss_without_label_bytes(x, z, w):
        enabled, ops.label_bytes_enabled = ops.label_bytes_enabled, False
        try:
            return loss(x, z, w)
        finally:
            ops.label_bytes_enabled = enabled
    return loss_without_label_bytes


def make_step(spec: PathSpec, direction: str, data_format: str) -> Callable:
    """step(logits, labels, weights) -> loss (fwd) or (loss, dloss/dlogits) (fwd_bwd)."""
    import tensorflow as tf

    loss_of = _loss_function(spec, data_format)
    if direction == "fwd":
        def body(x, z, w):
            return loss_of(x, z, w)
    elif direction == "fwd_bwd":
        def body(x, z, w):
            with tf.GradientTape() as tape:
                tape.watch(x)
                loss = loss_of(x, z, w)
            return loss, tape.gradient(loss, x)
    else:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    if spec.mode == "eager":
        return body
    return tf.function(body, jit_compile=(spec.mode == "xla"), autograph=False)


def run_step(step, inputs):
    """Runs one step to completion and returns its outputs (kept alive by the caller).

    CPU eager ops and tf.function calls return after their outputs are computed; fetching
    the scalar loss to NumPy is a cheap guard that the work has really finished.
    """
    out = step(*inputs)
    loss = out[0] if isinstance(out, tuple) else out
    loss.numpy()
    return out


_TARGET_RE = re.compile(r'custom_call_target="([^"]+)"')


def custom_call_targets(hlo_text: str):
    """The custom-call targets named in an HLO module's text, in order, without repeats."""
    return list(dict.fromkeys(_TARGET_RE.findall(hlo_text)))


def xla_label(spec: PathSpec, targets):
    """The table label of an XLA path, from the custom calls its compiled HLO contains."""
    if spec.name != "xla_auto":
        return spec.label
    if targets is None:
        return "xla (auto: HLO not inspectable)"
    if any("segloss" in t.lower() for t in targets):
        return "xla (custom call)"
    return "xla (reference fallback)"


def compiled_custom_calls(step, inputs):
    """Custom-call targets of a jit-compiled tf.function for these inputs, or None if the
    HLO cannot be obtained (experimental TF API)."""
    try:
        hlo = step.experimental_get_compiler_ir(*inputs)(stage="hlo")
    except Exception:  # noqa: BLE001 - an experimental API; the label says it was not checked
        return None
    return custom_call_targets(hlo)
