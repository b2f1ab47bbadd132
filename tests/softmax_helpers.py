"""Shared helpers of the softmax-mode tests: paths, random logits, class ids, one-hot."""
import numpy as np
import tensorflow as tf

PATHS = ("fused", "xla", "reference")


def implementation(path):
    return "reference" if path == "reference" else "auto"


def on_path(fn, path):
    """fn, XLA-compiled on the "xla" path."""
    return tf.function(fn, jit_compile=True) if path == "xla" else fn


def logits(rng, shape, dtype=np.float32, scale=3.0):
    x = rng.normal(0.0, scale, shape)
    x[rng.random(shape) < 0.05] = 0.0  # ties for the argmax (lowest index wins)
    return x.astype(dtype)


def ids(rng, shape, classes, ignore_index=None):
    ids = rng.integers(0, classes, shape)
    if ignore_index is not None:
        ids[rng.random(shape) < 0.2] = ignore_index
    return ids


def class_axis(rank, data_format):
    return rank - 1 if data_format == "channels_last" else 1


def one_hot(ids, classes, data_format, ignore_index=None):
    """float32 one-hot of ids in the logits' layout (ignored pixels all 0)."""
    valid = (ids >= 0) & (ids < classes)
    if ignore_index is not None:
        valid &= ids != ignore_index
    z = np.eye(classes, dtype=np.float32)[np.where(valid, ids, 0)] * valid[..., None]
    return z if data_format == "channels_last" else np.moveaxis(z, -1, 1)
