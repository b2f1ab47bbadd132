"""From [B, C, 8] statistics to the loss and every class's terms: tiny, pure TF, shared by
every code path (fused op, XLA custom call, reference, tf.distribute, the Keras metrics).

Order of reduction, always: first over pixels (and, in "batch" Dice mode, the batch) per
class, then a class-weighted mean over classes (and in "per_image" mode over images).
"""
from typing import NamedTuple

import numpy as np
import tensorflow as tf

from . import _inputs
from ._columns import Column

DICE_MODES = ("batch", "per_image")
EMPTY_MODES = ("include", "exclude")


class SegLossResult(NamedTuple):
    """The loss and its parts; the [C] vectors say which class the loss is made of."""

    total: tf.Tensor           # scalar: ce_weight * ce + dice_weight * dice_loss
    ce: tf.Tensor              # scalar: class-weighted mean of ce_per_class
    dice_loss: tf.Tensor       # scalar: 1 - (class-weighted mean soft Dice)
    ce_per_class: tf.Tensor    # [C]: sum(w*ce) / sum(w) over the batch
    dice_per_class: tf.Tensor  # [C]: soft Dice
    iou_per_class: tf.Tensor   # [C]: hard IoU tp / (pred + label - tp), 1 if 0/0
    loss_per_class: tf.Tensor  # [C]: each class's share of `total` (they sum to it)


def check_options(ce_weight, dice_weight, dice_mode, smooth, empty):
    """ValueError naming the argument for any option `combine` cannot take."""
    _inputs.check_choice("dice_mode", dice_mode, DICE_MODES)
    _inputs.check_choice("empty", empty, EMPTY_MODES)
    for name, value in (("ce_weight", ce_weight), ("dice_weight", dice_weight), ("smooth", smooth)):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not value >= 0 or value == float("inf"):
                raise ValueError(f"`{name}` must be a finite number >= 0, got {value!r}")
        elif not isinstance(value, tf.Tensor):
            raise ValueError(f"`{name}` must be a number, got {value!r}")


def class_weight_vector(class_weights, classes):
    """`class_weights` as float32 [C] (checked: >= 0, positive sum), or None."""
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
    """The loss and every class's terms from `segloss_stats`' [B, C, 8] statistics.

    Formula (sums over the batch in "batch" mode; cw = class_weights, default 1):

        CE_c   = ce_sum_c / weight_sum_c               (0 and left out if weight_sum_c = 0)
        CE     = Σ_c cw_c CE_c / Σ_c cw_c               (over classes with weight_sum_c > 0)
        Dice_c = (2 I_c + smooth) / (P_c + Z_c + smooth) (1 where the denominator is 0)
        dice_loss = 1 − Σ_c cw_c Dice_c / Σ_c cw_c      ("per_image": per image, then the
                                                         mean over images)
        total  = ce_weight · CE + dice_weight · dice_loss
        IoU_c  = tp_c / (pred_c + label_c − tp_c)      (hard; 1 where 0/0)

    With empty="exclude", a class with label_sum 0 (per image in "per_image" mode) leaves
    the Dice mean; an image with no class left leaves the mean over images; if nothing is
    left the Dice term is 0.

    Args:
      stats: float32 [B, C, 8] from `segloss_stats` (columns as `STAT_COLUMNS`).
      ce_weight, dice_weight: finite numbers >= 0 (or scalar tensors). Default 1.
      dice_mode: "batch" (default: one Dice per class over the whole batch) or
        "per_image" (one Dice per image and class, then the mean over images).
      smooth: added to the Dice numerator and denominator. Default 1e-5.
      empty: "include" (default) or "exclude" (see above).
      class_weights: optional [C], >= 0 with a positive sum.

    Returns:
      A `SegLossResult` of float32 tensors: total, ce, dice_loss (scalars) and
      ce_per_class, dice_per_class, iou_per_class, loss_per_class ([C]).
      `loss_per_class` is each class's contribution to `total`: they sum to it.

    Raises:
      ValueError: an option outside its allowed values, or stats not [B, C, 8].

    >>> import numpy as np, fused_segloss as fsl
    >>> stats = np.zeros([1, 2, 8], np.float32)
    >>> stats[0, :, :5] = [[8, 16, 6, 8, 8], [32, 16, 0, 2, 2]]  # ce, w, I, P, Z
    >>> res = fsl.combine(stats, smooth=0.0)
    >>> res.ce_per_class.numpy(), res.dice_per_class.numpy(), res.loss_per_class.numpy()
    (array([0.5, 2. ], dtype=float32), array([0.75, 0.  ], dtype=float32), array([0.375, 1.5  ], dtype=float32))
    """
    check_options(ce_weight, dice_weight, dice_mode, smooth, empty)
    stats = tf.convert_to_tensor(stats, tf.float32)
    if stats.shape.rank != 3 or stats.shape[-1] not in (None, len(Column)):
        raise ValueError(f"`stats` must have shape [B, C, {len(Column)}], got {stats.shape}")
    cw = class_weight_vector(class_weights, stats.shape[1])
    if cw is None:
        cw = tf.ones(tf.shape(stats)[1:2], tf.float32)
    # Eagerly, each of the few dozen small ops below would be dispatched on its own; as
    # one traced function they run as one graph. Python options are static arguments, so
    # each distinct set of options is traced once.
    impl = _combine_traced if tf.executing_eagerly() else _combine
    return impl(stats, cw, ce_weight, dice_weight, dice_mode, smooth, empty)


def _shares(values, weights, axis=-1):
    """weights · values / Σ weights along `axis`: the terms of a weighted mean, which sum
    to it (all 0 where Σ weights = 0)."""
    return tf.math.divide_no_nan(weights * values,
                                 tf.reduce_sum(weights, axis=axis, keepdims=True))


def _soft_dice(s, smooth):
    denominator = s[..., Column.PRED_SUM] + s[..., Column.LABEL_SUM] + smooth
    dice = tf.math.divide_no_nan(2.0 * s[..., Column.INTERSECTION] + smooth, denominator)
    return tf.where(denominator > 0, dice, 1.0)


def _combine(stats, cw, ce_weight, dice_weight, dice_mode, smooth, empty):
    smooth = tf.cast(smooth, tf.float32)
    totals = tf.reduce_sum(stats, axis=0)  # [C, 8]: the batch's per-class sums

    # Cross-entropy: per-class weighted mean over pixels and batch; classes whose every
    # element is ignored (weight_sum == 0) report 0 and leave the mean over classes.
    weight_sum = totals[:, Column.WEIGHT_SUM]
    ce_per_class = tf.math.divide_no_nan(totals[:, Column.CE_SUM], weight_sum)
    ce_shares = _shares(ce_per_class, cw * tf.cast(weight_sum > 0, tf.float32))

    batch_dice = _soft_dice(totals, smooth)  # [C]
    if dice_mode == "batch":
        dice_per_class = batch_dice
        present = tf.cast(totals[:, Column.LABEL_SUM] > 0, tf.float32)
        dice_shares = _shares(1.0 - batch_dice, cw * present if empty == "exclude" else cw)
    else:
        image_dice = _soft_dice(stats, smooth)  # [B, C]
        present = tf.cast(stats[..., Column.LABEL_SUM] > 0, tf.float32)
        counted = present if empty == "exclude" else tf.ones_like(present)
        image_shares = _shares(1.0 - image_dice, cw * counted)  # [B, C]
        image_counted = tf.cast(tf.reduce_any(cw * counted > 0, axis=1), tf.float32)  # [B]
        dice_shares = tf.reduce_sum(_shares(image_shares, image_counted[:, None], axis=0), 0)
        # Reported per class: the mean over the images that count it (batch Dice if none).
        per_class_mean = tf.math.divide_no_nan(tf.reduce_sum(counted * image_dice, 0),
                                               tf.reduce_sum(counted, 0))
        dice_per_class = tf.where(tf.reduce_sum(counted, 0) > 0, per_class_mean, batch_dice)

    tp = totals[:, Column.HARD_TP]
    union = totals[:, Column.HARD_PRED] + totals[:, Column.HARD_LABEL] - tp
    iou_per_class = tf.where(union > 0, tf.math.divide_no_nan(tp, union), 1.0)
    ce_weight, dice_weight = tf.cast(ce_weight, tf.float32), tf.cast(dice_weight, tf.float32)
    ce, dice_loss = tf.reduce_sum(ce_shares), tf.reduce_sum(dice_shares)
    return SegLossResult(total=ce_weight * ce + dice_weight * dice_loss, ce=ce,
                         dice_loss=dice_loss, ce_per_class=ce_per_class,
                         dice_per_class=dice_per_class, iou_per_class=iou_per_class,
                         loss_per_class=ce_weight * ce_shares + dice_weight * dice_shares)


_combine_traced = tf.function(_combine, autograph=False)
