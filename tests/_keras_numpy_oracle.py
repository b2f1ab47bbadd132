"""An independent float64 NumPy statement of DESIGN §2.1/§2.3 for the Keras tests.

Written from the spec, not from fused_segloss' code: channels_last only, weights already
broadcastable to the logits.
"""
import numpy as np


def softplus(t):
    return np.maximum(t, 0.0) + np.log1p(np.exp(-np.abs(t)))


def stats(logits, labels, weights=None, pos_weight=None):
    """[B, C, 8] float64 sums over the spatial axes (channels_last)."""
    x = np.asarray(logits, np.float64)
    z = np.asarray(labels, np.float64)
    w = np.ones_like(x) if weights is None else np.broadcast_to(np.asarray(weights, np.float64), x.shape)
    pw = 1.0 if pos_weight is None else np.asarray(pos_weight, np.float64)
    p = 1.0 / (1.0 + np.exp(-x))
    ce = pw * z * softplus(-x) + (1.0 - z) * softplus(x)
    hard_pred = (x > 0).astype(np.float64)
    hard_label = (z >= 0.5).astype(np.float64)
    columns = [w * ce, w, w * p * z, w * p, w * z, w * hard_pred * hard_label, w * hard_pred,
               w * hard_label]
    axes = tuple(range(1, x.ndim - 1))
    return np.stack([c.sum(axis=axes) for c in columns], axis=-1)


def per_class(totals, smooth=1e-5):
    """(ce, dice, iou) per class from [C, 8] totals."""
    ce = np.where(totals[:, 1] > 0, totals[:, 0] / np.where(totals[:, 1] > 0, totals[:, 1], 1), 0.0)
    dice_den = totals[:, 3] + totals[:, 4] + smooth
    dice = np.where(dice_den > 0, (2 * totals[:, 2] + smooth) / np.where(dice_den > 0, dice_den, 1), 1.0)
    iou_den = totals[:, 6] + totals[:, 7] - totals[:, 5]
    iou = np.where(iou_den > 0, totals[:, 5] / np.where(iou_den > 0, iou_den, 1), 1.0)
    return ce, dice, iou


def batch_loss(st, ce_weight=1.0, dice_weight=1.0, smooth=1e-5, class_weights=None,
               empty="include"):
    """Total loss in dice_mode="batch" from [B, C, 8] stats."""
    totals = st.sum(axis=0)
    cw = np.ones(totals.shape[0]) if class_weights is None else np.asarray(class_weights, np.float64)
    ce, dice, _ = per_class(totals, smooth)
    ce_mask = cw * (totals[:, 1] > 0)
    ce_term = (ce_mask * ce).sum() / ce_mask.sum() if ce_mask.sum() > 0 else 0.0
    dice_mask = cw * (totals[:, 4] > 0) if empty == "exclude" else cw
    dice_term = 1 - (dice_mask * dice).sum() / dice_mask.sum() if dice_mask.sum() > 0 else 0.0
    return ce_weight * ce_term + dice_weight * dice_term


def per_image_loss(st, smooth=1e-5, empty="include"):
    """Total loss (ce_weight = dice_weight = 1) in dice_mode="per_image", no class weights."""
    totals = st.sum(axis=0)
    ce, _, _ = per_class(totals, smooth)
    valid = totals[:, 1] > 0
    ce_term = ce[valid].mean() if valid.any() else 0.0
    image_dice = []
    for row in st:
        _, dice, _ = per_class(row, smooth)
        keep = row[:, 4] > 0 if empty == "exclude" else np.ones(len(row), bool)
        if keep.any():
            image_dice.append(dice[keep].mean())
    dice_term = 1 - np.mean(image_dice) if image_dice else 0.0
    return ce_term + dice_term
