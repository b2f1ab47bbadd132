"""From [B, C, 8] statistics to the loss (DESIGN §2.3): tiny, pure TF, shared by every path.

Order of reduction, always: first over pixels (and, in "batch" Dice mode, the batch) per
class, then a (class-weighted) mean over classes.
"""
from typing import NamedTuple

import numpy as np
import tensorflow as tf

from . import _inputs

DICE_MODES = ("batch", "per_image")
EMPTY_MODES = ("include", "exclude")

CE_SUM, WEIGHT_SUM, INTERSECTION, PRED_SUM, LABEL_SUM, HARD_TP, HARD_PRED, HARD_LABEL = range(8)


class SegLossResult(NamedTuple):
    total: tf.Tensor           # scalar: ce_weight * ce + dice_weight * dice_loss
    ce: tf.Tensor              # scalar: class-weighted mean of ce_per_class
    dice_loss: tf.Tensor       # scalar: 1 - (class-weighted mean soft Dice)
    ce_per_class: tf.Tensor    # [C]: sum(w*ce) / sum(w) over the batch
    dice_per_class: tf.Tensor  # [C]: soft Dice
    iou_per_class: tf.Tensor   # [C]: hard IoU tp / (pred + label - tp), 1 if 0/0


def _ratio_or(numerator, denominator, fallback):
    """numerator / denominator, `fallback` where denominator == 0 (gradient-safe)."""
    return tf.where(denominator > 0, tf.math.divide_no_nan(numerator, denominator), fallback)


def _weighted_mean(values, weights, axis=-1):
    """sum(w * v) / sum(w) over axis, 0 where sum(w) == 0; also returns sum(w) > 0."""
    denominator = tf.reduce_sum(weights, axis=axis)
    mean = tf.math.divide_no_nan(tf.reduce_sum(weights * values, axis=axis), denominator)
    return mean, denominator > 0


def check_options(ce_weight, dice_weight, dice_mode, smooth, empty):
    _inputs.check_choice("dice_mode", dice_mode, DICE_MODES)
    _inputs.check_choice("empty", empty, EMPTY_MODES)
    for name, value in (("ce_weight", ce_weight), ("dice_weight", dice_weight), ("smooth", smooth)):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not value >= 0 or value == float("inf"):
                raise ValueError(f"`{name}` must be a finite number >= 0, got {value!r}")
        elif not isinstance(value, tf.Tensor):
            raise ValueError(f"`{name}` must be a number, got {value!r}")


def class_weight_vector(class_weights, classes):
    if class_weights is None:
        return None
    cw = tf.cast(tf.convert_to_tensor(class_weights), tf.float32)
    if cw.shape.rank != 1 or (classes is not None and cw.shape[0] not in (None, classes)):
        raise ValueError(f"`class_weights` must have shape [C] = [{classes}], got {cw.shape}")
    static = tf.get_static_value(cw)
    if static is not None:
        if not np.all(np.isfinite(static)) or (static < 0).any() or not static.sum() > 0:
            raise ValueError(f"`class_weights` must be >= 0 with a positive sum, got {static.tolist()}")
        return cw
    with tf.control_dependencies([tf.debugging.Assert(
            tf.reduce_all(cw >= 0) & (tf.reduce_sum(cw) > 0),
            ["`class_weights` must be >= 0 with a positive sum"])]):
        return tf.identity(cw)


def combine(stats, *, ce_weight=1.0, dice_weight=1.0, dice_mode="batch", smooth=1e-5,
            empty="include", class_weights=None) -> SegLossResult:
    check_options(ce_weight, dice_weight, dice_mode, smooth, empty)
    stats = tf.convert_to_tensor(stats, tf.float32)
    if stats.shape.rank != 3 or stats.shape[-1] not in (None, 8):
        raise ValueError(f"`stats` must have shape [B, C, 8], got {stats.shape}")
    cw = class_weight_vector(class_weights, stats.shape[1])
    if cw is None:
        cw = tf.ones(tf.shape(stats)[1:2], tf.float32)
    # Eagerly, the ~40 tiny ops below would each pay TF's per-op dispatch cost (about 5 ms
    # in all, measured); one traced function runs them as a graph. Python options are
    # static arguments, so each distinct set of options is traced once.
    impl = _combine_graph if tf.executing_eagerly() else _combine_tensors
    return impl(stats, cw, ce_weight, dice_weight, dice_mode, smooth, empty)


def _combine_tensors(stats, cw, ce_weight, dice_weight, dice_mode, smooth, empty):
    smooth = tf.cast(smooth, tf.float32)

    totals = tf.reduce_sum(stats, axis=0)  # [C, 8]: the batch's per-class sums
    col = lambda s, k: s[..., k]  # noqa: E731

    # Cross-entropy: per-class weighted mean over pixels and batch; classes whose every
    # element is ignored (weight_sum == 0) report 0 and leave the mean over classes.
    weight_sum = col(totals, WEIGHT_SUM)
    ce_per_class = tf.math.divide_no_nan(col(totals, CE_SUM), weight_sum)
    ce, _ = _weighted_mean(ce_per_class, cw * tf.cast(weight_sum > 0, tf.float32))

    def soft_dice(s):
        denominator = col(s, PRED_SUM) + col(s, LABEL_SUM) + smooth
        return _ratio_or(2.0 * col(s, INTERSECTION) + smooth, denominator, 1.0)

    batch_dice = soft_dice(totals)  # [C]
    if dice_mode == "batch":
        dice_per_class = batch_dice
        present = tf.cast(col(totals, LABEL_SUM) > 0, tf.float32)
        class_mask = cw * present if empty == "exclude" else cw
        dice, any_class = _weighted_mean(dice_per_class, class_mask)
        dice_loss = tf.where(any_class, 1.0 - dice, 0.0)
    else:
        image_dice = soft_dice(stats)  # [B, C]
        present = tf.cast(col(stats, LABEL_SUM) > 0, tf.float32)
        class_mask = cw * present if empty == "exclude" else cw * tf.ones_like(present)
        per_image, image_counts = _weighted_mean(image_dice, class_mask)  # [B]
        image_mask = tf.cast(image_counts, tf.float32)
        mean_dice, any_image = _weighted_mean(per_image, image_mask, axis=0)
        dice_loss = tf.where(any_image, 1.0 - mean_dice, 0.0)
        counted = present if empty == "exclude" else tf.ones_like(present)
        per_class_mean, any_counted = _weighted_mean(image_dice, counted, axis=0)
        dice_per_class = tf.where(any_counted, per_class_mean, batch_dice)

    tp = col(totals, HARD_TP)
    iou_per_class = _ratio_or(tp, col(totals, HARD_PRED) + col(totals, HARD_LABEL) - tp, 1.0)
    total = tf.cast(ce_weight, tf.float32) * ce + tf.cast(dice_weight, tf.float32) * dice_loss
    return SegLossResult(total, ce, dice_loss, ce_per_class, dice_per_class, iou_per_class)


_combine_graph = tf.function(_combine_tensors, autograph=False)
