"""fused_segloss: fused sigmoid cross-entropy + soft Dice for multi-label segmentation.

    stats = segloss_stats(logits, labels, weights=None, pos_weight=None, *,
                          data_format="channels_last", squared=False, implementation="auto")
    res = combine(stats, ce_weight=1.0, dice_weight=1.0, dice_mode="batch", smooth=1e-5,
                  empty="include", class_weights=None)
    loss = seg_loss(logits, labels, ...)   # == res.total
"""
from . import _eager_fused, reference
from ._loader import FusedSeglossFallbackWarning
from .combine import SegLossResult, combine
from .ops import fused_available, segloss_stats
from .reference import STAT_COLUMNS

__version__ = "0.1.0"

_STATS_OPTIONS = ("data_format", "squared", "implementation", "check_numerics")
_COMBINE_OPTIONS = ("ce_weight", "dice_weight", "dice_mode", "smooth", "empty", "class_weights")


def seg_loss_result(logits, labels, weights=None, pos_weight=None, **options) -> SegLossResult:
    """segloss_stats followed by combine; options are the keywords of both."""
    unknown = set(options) - set(_STATS_OPTIONS) - set(_COMBINE_OPTIONS)
    if unknown:
        raise ValueError(f"unknown option(s) {sorted(unknown)}; valid options are "
                         f"{list(_STATS_OPTIONS + _COMBINE_OPTIONS)}")
    if _eager_fused.applicable(options):  # one traced call instead of several
        return _eager_fused.result(logits, labels, weights, pos_weight, **options)
    stats = segloss_stats(logits, labels, weights, pos_weight,
                          **{k: v for k, v in options.items() if k in _STATS_OPTIONS})
    return combine(stats, **{k: v for k, v in options.items() if k in _COMBINE_OPTIONS})


def seg_loss(logits, labels, weights=None, pos_weight=None, **options):
    """The scalar total loss (float32); see seg_loss_result for every term."""
    return seg_loss_result(logits, labels, weights, pos_weight, **options).total


def __getattr__(name):
    # `fsl.keras` is imported lazily so that importing the package does not import Keras.
    if name == "keras":
        import importlib

        return importlib.import_module(".keras", __name__)
    raise AttributeError(f"module 'fused_segloss' has no attribute {name!r}")


__all__ = ["segloss_stats", "combine", "seg_loss", "seg_loss_result", "SegLossResult",
           "reference", "STAT_COLUMNS", "fused_available", "FusedSeglossFallbackWarning"]
