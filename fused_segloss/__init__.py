"""fused_segloss: sigmoid cross-entropy + per-class soft Dice for TensorFlow, in one fused pass.

    stats = segloss_stats(logits, labels, weights=None, pos_weight=None, *,
                          data_format="channels_last", squared=False, implementation="auto",
                          activation="sigmoid", ignore_index=None)
    res = combine(stats, ce_weight=1.0, dice_weight=1.0, dice_mode="batch", smooth=1e-5,
                  empty="include", class_weights=None, activation="sigmoid",
                  include_background=True)
    loss = seg_loss(logits, labels, ...)   # == res.total

`fused_segloss.keras` (SegLoss, SegMetrics) is imported on first use, so that importing
the package does not import Keras.
"""
import os as _os
import sys as _sys

# `python -m fused_segloss ...` imports this package (and TensorFlow) before __main__ runs,
# and TensorFlow reads its C++ log level when it loads: the command line's quiet default
# must be set here. Python sets argv[0] to "-m" only while it locates the -m module, so
# an import from user code never gets here; a level the user set always wins.
if _sys.argv[:1] == ["-m"]:
    _os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from . import reference  # noqa: E402
from ._columns import STAT_COLUMNS, Column  # noqa: E402
from ._loader import FusedSeglossFallbackWarning  # noqa: E402
from ._version import __version__  # noqa: E402
from .combine import (SegLossResult, check_activation_options,  # noqa: E402
                      check_overlap_with_squared, combine)
from .ops import fused_available, segloss_stats  # noqa: E402

_STATS_OPTIONS = ("data_format", "squared", "implementation", "check_numerics",
                  "focal_gamma", "focal_alpha", "activation", "ignore_index")
_COMBINE_OPTIONS = ("ce_weight", "dice_weight", "dice_mode", "smooth", "empty", "class_weights",
                    "overlap", "tversky_alpha", "tversky_beta", "activation",
                    "include_background")


def seg_loss_result(logits, labels, weights=None, pos_weight=None, **options) -> SegLossResult:
    """The loss and every class's terms: `combine(segloss_stats(...), ...)`.

    Args:
      logits, labels, weights, pos_weight: as in `segloss_stats`.
      **options: the keywords of `segloss_stats` (data_format, squared, implementation,
        check_numerics, focal_gamma, focal_alpha, activation, ignore_index) and of `combine`
        (ce_weight, dice_weight, dice_mode, smooth, empty, class_weights, overlap,
        tversky_alpha, tversky_beta, activation, include_background). `activation`
        ("sigmoid" or "softmax") goes to both.

    Returns:
      A `SegLossResult`: total, ce, dice_loss and the [C] vectors ce_per_class,
      dice_per_class, iou_per_class, loss_per_class, overlap_per_class.

    Raises:
      ValueError: an unknown option, a bad value (see segloss_stats and combine),
        overlap="tversky" with squared=True, or include_background=False with sigmoid.

    >>> import numpy as np, fused_segloss as fsl
    >>> logits = np.where(np.eye(3, dtype=bool)[None], 9.0, -9.0).astype(np.float32)
    >>> res = fsl.seg_loss_result(logits, np.eye(3, dtype=np.float32)[None])
    >>> res.iou_per_class.numpy(), round(float(res.total), 4)
    (array([1., 1., 1.], dtype=float32), 0.0003)
    >>> ids = np.array([[0, 1, 2]])                          # softmax, sparse class ids
    >>> res = fsl.seg_loss_result(logits, ids, activation="softmax", include_background=False)
    >>> res.iou_per_class.numpy(), round(float(res.ce), 4)   # CE = -log softmax([9, -9, -9])_0
    (array([1., 1., 1.], dtype=float32), 0.0)
    """
    unknown = set(options) - set(_STATS_OPTIONS) - set(_COMBINE_OPTIONS)
    if unknown:
        raise ValueError(f"unknown option(s) {sorted(unknown)}; valid options are "
                         f"{list(_STATS_OPTIONS + _COMBINE_OPTIONS)}")
    check_overlap_with_squared(options.get("overlap", "dice"), options.get("squared", False))
    check_activation_options(options.get("activation", "sigmoid"),
                             options.get("include_background", True))
    stats = segloss_stats(logits, labels, weights, pos_weight,
                          **{k: v for k, v in options.items() if k in _STATS_OPTIONS})
    return combine(stats, **{k: v for k, v in options.items() if k in _COMBINE_OPTIONS})


def seg_loss(logits, labels, weights=None, pos_weight=None, **options):
    """The scalar total loss (float32): `seg_loss_result(...).total`.

    Formula: total = ce_weight · CE + dice_weight · (1 − Dice), where CE is the
    class-weighted mean of each class's weighted-mean cross-entropy (softmax: the
    class-weighted mean over labelled pixels) and Dice the class-weighted mean soft Dice
    (see `combine`).

    >>> import numpy as np, fused_segloss as fsl
    >>> logits = np.zeros([2, 8, 8, 3], np.float32)
    >>> labels = np.ones([2, 8, 8, 3], np.float32)
    >>> round(float(fsl.seg_loss(logits, labels)), 4)   # log(2) + (1 - 2/3)
    1.0265
    >>> ids = np.zeros([2, 8, 8], np.int32)             # softmax: every pixel class 0
    >>> round(float(fsl.seg_loss(logits, ids, activation="softmax", dice_weight=0.0)), 4)
    1.0986
    """
    return seg_loss_result(logits, labels, weights, pos_weight, **options).total


def __getattr__(name):
    # `fsl.keras` and `fsl.demo` are imported lazily: importing the package stays light.
    if name in ("keras", "demo"):
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'fused_segloss' has no attribute {name!r}")


__all__ = ["segloss_stats", "combine", "seg_loss", "seg_loss_result", "SegLossResult",
           "reference", "STAT_COLUMNS", "Column", "fused_available",
           "FusedSeglossFallbackWarning", "__version__"]
