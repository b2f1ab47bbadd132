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
OVERLAPS = ("dice", "jaccard", "tversky", "generalized_dice")


class SegLossResult(NamedTuple):
    """The loss and its parts; the [C] vectors say which class the loss is made of."""

    total: tf.Tensor           # scalar: ce_weight * ce + dice_weight * dice_loss
    ce: tf.Tensor              # scalar: class-weighted mean of ce_per_class
    dice_loss: tf.Tensor       # scalar: the overlap term, 1 - (class-weighted mean index)
    ce_per_class: tf.Tensor    # [C]: sum(w*ce) / sum(w) over the batch
    dice_per_class: tf.Tensor  # [C]: soft Dice
    iou_per_class: tf.Tensor   # [C]: hard IoU tp / (pred + label - tp), 1 if 0/0
    loss_per_class: tf.Tensor  # [C]: each class's share of `total` (they sum to it)
    overlap_per_class: tf.Tensor  # [C]: the chosen overlap index (Dice, Jaccard, Tversky)


def check_options(ce_weight, dice_weight, dice_mode, smooth, empty, overlap="dice",
                  tversky_alpha=0.5, tversky_beta=0.5):
    """ValueError naming the argument(s) for any option (or pair) `combine` cannot take."""
    _inputs.check_choice("dice_mode", dice_mode, DICE_MODES)
    _inputs.check_choice("empty", empty, EMPTY_MODES)
    _inputs.check_choice("overlap", overlap, OVERLAPS)
    if overlap == "generalized_dice" and empty == "exclude":
        raise ValueError("`empty`='exclude' does not apply to `overlap`='generalized_dice': "
                         "it is one value over all classes, whose weights already handle "
                         "empty classes; use empty='include'")
    if overlap != "tversky" and (tversky_alpha, tversky_beta) != (0.5, 0.5):
        raise ValueError(f"`tversky_alpha`/`tversky_beta` only apply to overlap='tversky', "
                         f"got `overlap`={overlap!r} with tversky_alpha={tversky_alpha!r}, "
                         f"tversky_beta={tversky_beta!r}")
    for name, value in (("ce_weight", ce_weight), ("dice_weight", dice_weight), ("smooth", smooth),
                        ("tversky_alpha", tversky_alpha), ("tversky_beta", tversky_beta)):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not value >= 0 or value == float("inf"):
                raise ValueError(f"`{name}` must be a finite number >= 0, got {value!r}")
        elif not isinstance(value, tf.Tensor):
            raise ValueError(f"`{name}` must be a number, got {value!r}")


def check_activation_options(activation, include_background):
    """ValueError naming both options where include_background cannot apply."""
    _inputs.check_choice("activation", activation, _inputs.ACTIVATIONS)
    if not isinstance(include_background, bool):
        raise ValueError(f"`include_background` must be a bool, got {include_background!r}")
    if not include_background and activation != "softmax":
        raise ValueError("`include_background`=False needs `activation`='softmax' (class 0 is "
                         "the background only when classes are exclusive); with sigmoid, "
                         "leave a class out with class_weights")


def check_overlap_with_squared(overlap, squared):
    """ValueError for the one statistics/combine pair that does not go together."""
    if overlap == "tversky" and squared:
        raise ValueError("`overlap`='tversky' needs the plain sums P = Σ w·p and Z = Σ w·z "
                         "(its false positives are P − I): it does not go with `squared`=True")


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
            empty="include", class_weights=None, overlap="dice", tversky_alpha=0.5,
            tversky_beta=0.5, activation="sigmoid", include_background=True) -> SegLossResult:
    """The loss and every class's terms from `segloss_stats`' [B, C, 8] statistics.

    Formula (sums over the batch in "batch" mode; cw = class_weights, default 1; I, P, Z
    the intersection, pred and label sums; s = smooth):

        CE_c   = ce_sum_c / weight_sum_c               (0 and left out if weight_sum_c = 0)
        CE     = Σ_c cw_c CE_c / Σ_c cw_c               (sigmoid: over classes with
                                                         weight_sum_c > 0)
        CE     = Σ_c cw_c ce_sum_c / Σ_c cw_c weight_sum_c   (softmax: the mean over the
                 batch's labelled pixels, 0 if none; Keras' SparseCategoricalCrossentropy
                 without class weights, PyTorch's CrossEntropyLoss(weight=cw) with them)
        overlap index per class (1 where its denominator is 0):
          "dice"     D_c = (2 I + s) / (P + Z + s)
          "jaccard"  J_c = (I + s) / (P + Z − I + s)
          "tversky"  T_c = (I + s) / (I + α (P − I) + β (Z − I) + s)   α, β = tversky_alpha/beta
        dice_loss = 1 − Σ_c cw_c X_c / Σ_c cw_c          ("per_image": per image, then the
                                                         mean over images)
          "generalized_dice" (Sudre et al. 2017): v_c = 1 / Z_c² (a class with Z_c = 0
          takes the largest v of the other classes, 0 if none), w_c = cw_c v_c,
          dice_loss = 1 − (2 Σ w I + s) / (Σ w (P + Z) + s), per image in "per_image" mode
        total  = ce_weight · CE + dice_weight · dice_loss
        IoU_c  = tp_c / (pred_c + label_c − tp_c)      (hard; 1 where 0/0)

    With empty="exclude", a class with label_sum 0 (per image in "per_image" mode) leaves
    the overlap mean; an image with no class left leaves the mean over images; if nothing
    is left the overlap term is 0. With include_background=False (softmax), class 0 has
    weight 0 in the overlap term only (as MONAI's DiceCELoss); the CE keeps it.

    Args:
      stats: float32 [B, C, 8] from `segloss_stats` (columns as `STAT_COLUMNS`).
      ce_weight, dice_weight: finite numbers >= 0 (or scalar tensors). Default 1.
        `dice_weight` weights whichever overlap term is chosen.
      dice_mode: "batch" (default: one overlap per class over the whole batch) or
        "per_image" (one per image and class, then the mean over images).
      smooth: added to the overlap's numerator and denominator. Default 1e-5.
      empty: "include" (default) or "exclude" (see above; not with generalized_dice).
      class_weights: optional [C], >= 0 with a positive sum.
      overlap: "dice" (default), "jaccard", "tversky" or "generalized_dice".
      tversky_alpha, tversky_beta: weights of false positives and false negatives in the
        Tversky index (>= 0, default 0.5 each: the Dice); only with overlap="tversky".
        Tversky needs the plain sums (segloss_stats with squared=False).
      activation: "sigmoid" (default) or "softmax": how the stats were made; it decides
        the CE term (see Formula).
      include_background: True (default); False leaves class 0 out of the overlap term
        (softmax only).

    Returns:
      A `SegLossResult` of float32 tensors: total, ce, dice_loss (scalars) and
      ce_per_class, dice_per_class, iou_per_class, loss_per_class, overlap_per_class
      ([C]). `loss_per_class` is each class's contribution to `total`: they sum to it.
      `overlap_per_class` is the chosen index per class (the soft Dice for "dice" and
      "generalized_dice", whose single value has no per-class form).

    Raises:
      ValueError: an option outside its allowed values, a pair of options that do not
        go together (naming both, e.g. include_background=False with sigmoid), or stats
        not [B, C, 8].

    >>> import numpy as np, fused_segloss as fsl
    >>> stats = np.zeros([1, 2, 8], np.float32)
    >>> stats[0, :, :5] = [[8, 16, 6, 8, 8], [32, 16, 0, 2, 2]]  # ce, w, I, P, Z
    >>> res = fsl.combine(stats, smooth=0.0)
    >>> res.ce_per_class.numpy(), res.dice_per_class.numpy(), res.loss_per_class.numpy()
    (array([0.5, 2. ], dtype=float32), array([0.75, 0.  ], dtype=float32), array([0.375, 1.5  ], dtype=float32))
    >>> fsl.combine(stats, smooth=0.0, overlap="jaccard").overlap_per_class.numpy()
    array([0.6, 0. ], dtype=float32)
    >>> float(fsl.combine(stats, smooth=0.0, activation="softmax").ce)  # (8 + 32) / 32
    1.25
    """
    check_options(ce_weight, dice_weight, dice_mode, smooth, empty, overlap, tversky_alpha,
                  tversky_beta)
    check_activation_options(activation, include_background)
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
    return impl(stats, cw, ce_weight, dice_weight, dice_mode, smooth, empty,
                (overlap, tversky_alpha, tversky_beta), activation == "softmax",
                include_background)


def _shares(values, weights, axis=-1):
    """weights · values / Σ weights along `axis`: the terms of a weighted mean, which sum
    to it (all 0 where Σ weights = 0)."""
    return tf.math.divide_no_nan(weights * values,
                                 tf.reduce_sum(weights, axis=axis, keepdims=True))


def _ratio_or_one(numerator, denominator):
    return tf.where(denominator > 0, tf.math.divide_no_nan(numerator, denominator), 1.0)


def _index(s, smooth, overlap):
    """The per-class overlap index of sums s [..., 8] (1 where its denominator is 0)."""
    kind, alpha, beta = overlap
    i, p, z = s[..., Column.INTERSECTION], s[..., Column.PRED_SUM], s[..., Column.LABEL_SUM]
    if kind == "jaccard":
        return _ratio_or_one(i + smooth, p + z - i + smooth)
    if kind == "tversky":
        alpha, beta = tf.cast(alpha, tf.float32), tf.cast(beta, tf.float32)
        return _ratio_or_one(i + smooth, i + alpha * (p - i) + beta * (z - i) + smooth)
    return _ratio_or_one(2.0 * i + smooth, p + z + smooth)  # Dice (and generalized Dice's)


def _generalized_dice_shares(s, cw, smooth):
    """Each class's part of 1 − GD for sums s [..., C, 8] (one GD per leading index).

    1 − GD = Σ_c w_c (P_c + Z_c − 2 I_c) / (Σ_c w_c (P_c + Z_c) + s): the classes' parts
    add up to it exactly, and all are 0 where the denominator is 0 (GD = 1 there)."""
    i, p, z = s[..., Column.INTERSECTION], s[..., Column.PRED_SUM], s[..., Column.LABEL_SUM]
    present = z > 0
    v = tf.where(present, 1.0 / tf.square(tf.where(present, z, 1.0)), 0.0)
    v = tf.where(present, v, tf.reduce_max(v, axis=-1, keepdims=True))  # absent: largest v
    w = tf.stop_gradient(cw * v)  # weights of the classes, not functions of the logits
    denominator = tf.reduce_sum(w * (p + z), axis=-1, keepdims=True) + smooth
    return tf.math.divide_no_nan(w * (p + z - 2.0 * i), denominator)


def _combine(stats, cw, ce_weight, dice_weight, dice_mode, smooth, empty, overlap,
             softmax=False, include_background=True):
    smooth = tf.cast(smooth, tf.float32)
    totals = tf.reduce_sum(stats, axis=0)  # [C, 8]: the batch's per-class sums

    # Cross-entropy: per-class weighted mean over pixels and batch; classes whose every
    # element is ignored (weight_sum == 0) report 0 and leave the mean over classes.
    weight_sum = totals[:, Column.WEIGHT_SUM]
    ce_per_class = tf.math.divide_no_nan(totals[:, Column.CE_SUM], weight_sum)
    if softmax:
        # One class per pixel: the mean over labelled pixels, each weighted by its class's
        # weight (weight_sum_c is class c's labelled weight), not a mean of class means.
        ce_shares = tf.math.divide_no_nan(cw * totals[:, Column.CE_SUM],
                                          tf.reduce_sum(cw * weight_sum))
    else:
        ce_shares = _shares(ce_per_class, cw * tf.cast(weight_sum > 0, tf.float32))
    if not include_background:  # class 0 leaves the overlap term only
        cw = tf.concat([tf.zeros_like(cw[:1]), cw[1:]], axis=0)

    dice_index = ("dice", 0.5, 0.5)
    batch_dice, batch_index = _index(totals, smooth, dice_index), _index(totals, smooth, overlap)
    generalized = overlap[0] == "generalized_dice"
    if dice_mode == "batch":
        dice_per_class, overlap_per_class = batch_dice, batch_index
        present = tf.cast(totals[:, Column.LABEL_SUM] > 0, tf.float32)
        if generalized:
            dice_shares = _generalized_dice_shares(totals, cw, smooth)
        else:
            dice_shares = _shares(1.0 - batch_index, cw * present if empty == "exclude" else cw)
    else:
        present = tf.cast(stats[..., Column.LABEL_SUM] > 0, tf.float32)  # [B, C]
        counted = present if empty == "exclude" else tf.ones_like(present)
        image_index = _index(stats, smooth, overlap)  # [B, C]
        if generalized:
            image_shares = _generalized_dice_shares(stats, cw, smooth)
        else:
            image_shares = _shares(1.0 - image_index, cw * counted)
        image_counted = tf.cast(tf.reduce_any(cw * counted > 0, axis=1), tf.float32)  # [B]
        dice_shares = tf.reduce_sum(_shares(image_shares, image_counted[:, None], axis=0), 0)

        # Reported per class: the mean over the images that count it (batch value if none).
        def per_class(image_values, batch_values):
            mean = tf.math.divide_no_nan(tf.reduce_sum(counted * image_values, 0),
                                         tf.reduce_sum(counted, 0))
            return tf.where(tf.reduce_sum(counted, 0) > 0, mean, batch_values)

        dice_per_class = per_class(_index(stats, smooth, dice_index), batch_dice)
        overlap_per_class = per_class(image_index, batch_index)

    tp = totals[:, Column.HARD_TP]
    union = totals[:, Column.HARD_PRED] + totals[:, Column.HARD_LABEL] - tp
    iou_per_class = _ratio_or_one(tp, union)
    ce_weight, dice_weight = tf.cast(ce_weight, tf.float32), tf.cast(dice_weight, tf.float32)
    ce, dice_loss = tf.reduce_sum(ce_shares), tf.reduce_sum(dice_shares)
    return SegLossResult(total=ce_weight * ce + dice_weight * dice_loss, ce=ce,
                         dice_loss=dice_loss, ce_per_class=ce_per_class,
                         dice_per_class=dice_per_class, iou_per_class=iou_per_class,
                         loss_per_class=ce_weight * ce_shares + dice_weight * dice_shares,
                         overlap_per_class=overlap_per_class)


_combine_traced = tf.function(_combine, autograph=False)
