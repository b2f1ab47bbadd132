"""The benchmark shape, group names and NumPy oracle, shared by conftest.py and the suites (a
module of its own so that no test imports conftest). FSL_BENCH_SIZE shrinks the images, e.g.
for CI."""
import os

import numpy as np

BATCH, CLASSES = 8, 5
SIZE = int(os.environ.get("FSL_BENCH_SIZE", "512"))
_SHAPE = f"{BATCH}x{SIZE}x{SIZE}x{CLASSES}"
GROUP = f"seg_loss fwd+bwd {_SHAPE} float32"
FORWARD_GROUP = f"seg_loss forward only {_SHAPE} float32"
VARIANTS_GROUP = f"fused seg_loss fwd+bwd variants {_SHAPE}"
FUSED_LABEL = "fused (eager)"


def expected_total(logits, labels, weights=None, channels_last=True, smooth=1e-5):
    """seg_loss's default total in float64 NumPy, written from DESIGN §2: per-class weighted
    mean CE, batch soft Dice per class, total = mean CE + 1 - mean Dice."""
    x = np.asarray(logits, np.float64)
    z = np.asarray(labels, np.float64)
    w = (np.ones_like(x) if weights is None
         else np.broadcast_to(np.asarray(weights, np.float64), x.shape))
    if not channels_last:
        x, z, w = (np.moveaxis(a, 1, -1) for a in (x, z, w))
    axes = tuple(range(x.ndim - 1))
    ce = np.maximum(x, 0) - x * z + np.log1p(np.exp(-np.abs(x)))
    ce_per_class = np.sum(w * ce, axis=axes) / np.sum(w, axis=axes)
    p = 1.0 / (1.0 + np.exp(-x))
    dice = ((2 * np.sum(w * p * z, axis=axes) + smooth)
            / (np.sum(w * p, axis=axes) + np.sum(w * z, axis=axes) + smooth))
    return np.mean(ce_per_class) + 1.0 - np.mean(dice)
