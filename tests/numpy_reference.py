"""An independent float64 NumPy implementation of the statistics, their gradient and
`combine` (the README's semantics table), the tests' oracle.

Written from the spec alone (not from the package): every function takes NumPy arrays of
any dtype, computes in float64 and returns float64. Weights broadcast NumPy-style to the
logits' shape; `data_format` is "channels_last" ([B, *S, C]) or "channels_first" ([B, C, *S]).

    stats(logits, labels, weights, pos_weight, data_format, squared)        -> [B, C, 8]
    logit_grad(logits, labels, weights, pos_weight, grad_stats, ...)         -> logits' shape
    logit_grad_scale(...)   -> per element, the sum of the magnitudes of the gradient's terms
    combine(stats, **options)      -> CombineResult (total, ce, dice_loss, per-class vectors)
    combine_grad(stats, **options) -> d total / d stats [B, C, 8] (columns 0, 2, 3; rest 0)
"""
from typing import NamedTuple

import numpy as np

STAT_NAMES = ("ce_sum", "weight_sum", "intersection", "pred_sum", "label_sum",
              "hard_tp", "hard_pred", "hard_label")
CE_SUM, WEIGHT_SUM, INTERSECTION, PRED_SUM, LABEL_SUM, HARD_TP, HARD_PRED, HARD_LABEL = range(8)


# ----------------------------------------------------------------------------------------
# Per-element math (float64)

def softplus(t):
    """log(1 + e^t), stable for any t."""
    return np.maximum(t, 0.0) + np.log1p(np.exp(-np.abs(t)))


def sigmoid(t):
    """1 / (1 + e^-t) without overflow; sigmoid(-t) gives 1 - sigmoid(t) without cancellation."""
    e = np.exp(-np.abs(t))
    return np.where(t >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def _as_float64(a):
    return np.asarray(a).astype(np.float64)


def to_channels_last(a, data_format):
    """[B, C, *S] -> [B, *S, C] for channels_first; channels_last is returned as is."""
    if data_format == "channels_first":
        return np.moveaxis(a, 1, -1)
    if data_format != "channels_last":
        raise ValueError(f"bad data_format {data_format!r}")
    return a


def from_channels_last(a, data_format):
    return np.moveaxis(a, -1, 1) if data_format == "channels_first" else a


def _elements(logits, labels, weights, pos_weight, data_format):
    """float64 x, z, w, pw, each viewed as [B, N, C] (pw broadcast over B and N)."""
    x = _as_float64(logits)
    z = _as_float64(labels)
    if x.shape != z.shape:
        raise ValueError(f"labels shape {z.shape} != logits shape {x.shape}")
    w = np.ones_like(x) if weights is None else np.broadcast_to(_as_float64(weights), x.shape)
    x, z, w = (to_channels_last(a, data_format) for a in (x, z, w))
    batch, classes = x.shape[0], x.shape[-1]
    positions = int(np.prod(x.shape[1:-1]))  # explicit: -1 is ambiguous for a size-0 batch
    x, z, w = (a.reshape(batch, positions, classes) for a in (x, z, w))
    pw = np.ones(classes) if pos_weight is None else _as_float64(pos_weight).reshape(classes)
    return x, z, w, pw[None, None, :]


# ----------------------------------------------------------------------------------------
# §2.1 statistics and §2.2 gradient

def _focal_parts(x, z, focal_gamma, focal_alpha):
    """a_t·(1 - p_t)^gamma and r = p(1 - p)/(1 - p_t) (its limit where 1 - p_t is 0)."""
    p, one_minus_p = sigmoid(x), sigmoid(-x)
    one_minus_pt = z * one_minus_p + (1.0 - z) * p
    a_t = 1.0 if focal_alpha is None else z * focal_alpha + (1.0 - z) * (1.0 - focal_alpha)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(one_minus_pt > 0, p * one_minus_p / one_minus_pt,
                         np.where(x >= 0, p, one_minus_p))
    return a_t * one_minus_pt ** focal_gamma, ratio


def stats(logits, labels, weights=None, pos_weight=None, data_format="channels_last",
          squared=False, focal_gamma=0.0, focal_alpha=None):
    """[B, C, 8] float64: per image and class, sums over the spatial positions.

    focal_gamma / focal_alpha: the focal factor a_t·(1 - p_t)^gamma of the ce_sum terms."""
    x, z, w, pw = _elements(logits, labels, weights, pos_weight, data_format)
    k = 2.0 if squared else 1.0
    p = sigmoid(x)
    ce = pw * z * softplus(-x) + (1.0 - z) * softplus(x)
    if focal_gamma != 0.0 or focal_alpha is not None:
        ce = _focal_parts(x, z, focal_gamma, focal_alpha)[0] * ce
    pred_hard = (x > 0).astype(np.float64)
    label_hard = (z >= 0.5).astype(np.float64)
    columns = [w * ce, w, w * p * z, w * p ** k, w * z ** k,
               w * pred_hard * label_hard, w * pred_hard, w * label_hard]
    return np.stack([c.sum(axis=1) for c in columns], axis=-1)


def _gradient_terms(logits, labels, weights, pos_weight, grad_stats, data_format, squared,
                    focal_gamma=0.0, focal_alpha=None):
    """The terms of dL/dx, weight applied, each [B, N, C]:
    (CE term, intersection term, pred_sum term, |CE term| with both parts of ce' taken
    in magnitude)."""
    x, z, w, pw = _elements(logits, labels, weights, pos_weight, data_format)
    g = _as_float64(grad_stats)
    g_ce, g_inter, g_pred = (g[:, None, :, col] for col in (CE_SUM, INTERSECTION, PRED_SUM))
    p, one_minus_p = sigmoid(x), sigmoid(-x)
    p_1mp = p * one_minus_p
    ce_grad = (1.0 - z) * p - pw * z * one_minus_p
    ce_grad_magnitude = (1.0 - z) * p + pw * z * one_minus_p
    pred_grad = 2.0 * p * p_1mp if squared else p_1mp
    if focal_gamma != 0.0 or focal_alpha is not None:
        # d[a_t·(1 - p_t)^g·ce] = a_t·(1 - p_t)^g·(ce' - g·(2z - 1)·r·ce)
        factor, ratio = _focal_parts(x, z, focal_gamma, focal_alpha)
        ce = pw * z * softplus(-x) + (1.0 - z) * softplus(x)
        focal_term = focal_gamma * (2.0 * z - 1.0) * ratio * ce
        ce_grad = factor * (ce_grad - focal_term)
        ce_grad_magnitude = factor * (ce_grad_magnitude + np.abs(focal_term))
    return (w * g_ce * ce_grad, w * g_inter * z * p_1mp, w * g_pred * pred_grad,
            w * np.abs(g_ce) * ce_grad_magnitude)


def _restore(flat, logits, data_format):
    """[B, N, C] -> the logits' own shape and layout."""
    shape_last = to_channels_last(np.empty(np.shape(logits), np.uint8), data_format).shape
    return from_channels_last(flat.reshape(shape_last), data_format)


def logit_grad(logits, labels, weights=None, pos_weight=None, grad_stats=None,
               data_format="channels_last", squared=False, focal_gamma=0.0, focal_alpha=None):
    """dL/dlogits (float64, logits' shape) for upstream grad_stats = dL/dstats [B, C, 8].

    Only columns 0 (ce_sum), 2 (intersection) and 3 (pred_sum) depend on the logits
    differentiably; the other columns contribute nothing.
    """
    ce, inter, pred, _ = _gradient_terms(logits, labels, weights, pos_weight, grad_stats,
                                         data_format, squared, focal_gamma, focal_alpha)
    return _restore(ce + inter + pred, logits, data_format)


def logit_grad_scale(logits, labels, weights=None, pos_weight=None, grad_stats=None,
                     data_format="channels_last", squared=False, focal_gamma=0.0,
                     focal_alpha=None):
    """Per element, the sum of the magnitudes of what dL/dx adds up (both parts of ce'
    taken in magnitude): a relative tolerance on it covers cancellation (e.g. soft labels
    where ce' ~ 0) without hiding errors in the large terms."""
    _, inter, pred, ce_magnitude = _gradient_terms(logits, labels, weights, pos_weight,
                                                   grad_stats, data_format, squared,
                                                   focal_gamma, focal_alpha)
    return _restore(ce_magnitude + np.abs(inter) + np.abs(pred), logits, data_format)


# ----------------------------------------------------------------------------------------
# §2.3 combine

class CombineResult(NamedTuple):
    total: float
    ce: float
    dice_loss: float
    ce_per_class: np.ndarray
    dice_per_class: np.ndarray   # per_image mode: NaN for a class no image counts
    iou_per_class: np.ndarray
    loss_per_class: np.ndarray  # each class's part of total: ce_weight·m_c·CE_c/Σm + ...


def safe_ratio(numerator, denominator, where_zero):
    safe = np.where(denominator != 0, denominator, 1.0)
    return np.where(denominator != 0, numerator / safe, where_zero)


def _weighted_mean(values, weights, axis=-1):
    """(sum(w v) / sum(w), sum(w) > 0); the mean is 0 where sum(w) == 0."""
    denominator = weights.sum(axis=axis)
    return safe_ratio((weights * values).sum(axis=axis), denominator, 0.0), denominator > 0


def _options(classes, class_weights, dice_mode, empty):
    if dice_mode not in ("batch", "per_image") or empty not in ("include", "exclude"):
        raise ValueError(f"bad option dice_mode={dice_mode!r} empty={empty!r}")
    cw = np.ones(classes) if class_weights is None else _as_float64(class_weights)
    return cw


def _dice_parts(s, smooth):
    """Soft Dice (2I + s) / (P + Z + s), 1 where the denominator is 0; and its derivatives
    with respect to I and P (0 where the denominator is 0: D is constant there)."""
    numerator = 2.0 * s[..., INTERSECTION] + smooth
    denominator = s[..., PRED_SUM] + s[..., LABEL_SUM] + smooth
    dice = safe_ratio(numerator, denominator, 1.0)
    d_inter = safe_ratio(2.0, denominator, 0.0)
    d_pred = safe_ratio(-numerator, denominator ** 2, 0.0)
    return dice, d_inter, d_pred


def _ce_part(s, cw):
    totals = s.sum(axis=0)
    weight_sum = totals[:, WEIGHT_SUM]
    ce_per_class = safe_ratio(totals[:, CE_SUM], weight_sum, 0.0)
    class_mask = cw * (weight_sum > 0)
    ce, _ = _weighted_mean(ce_per_class, class_mask)
    return ce, ce_per_class, class_mask, weight_sum


def combine(stats, *, ce_weight=1.0, dice_weight=1.0, dice_mode="batch", smooth=1e-5,
            empty="include", class_weights=None):
    s = _as_float64(stats)
    cw = _options(s.shape[1], class_weights, dice_mode, empty)
    totals = s.sum(axis=0)
    ce, ce_per_class, _, _ = _ce_part(s, cw)

    _, _, ce_mask, _ = _ce_part(s, cw)
    ce_part = safe_ratio(ce_mask * ce_per_class, ce_mask.sum(), 0.0)  # [C], sums to ce
    if dice_mode == "batch":
        dice_per_class, _, _ = _dice_parts(totals, smooth)
        class_mask = cw * (totals[:, LABEL_SUM] > 0) if empty == "exclude" else cw
        dice, any_class = _weighted_mean(dice_per_class, class_mask)
        dice_loss = 1.0 - dice if any_class else 0.0
        dice_part = safe_ratio(class_mask * (1.0 - dice_per_class), class_mask.sum(), 0.0)
    else:
        image_dice, _, _ = _dice_parts(s, smooth)                        # [B, C]
        counted = (s[..., LABEL_SUM] > 0) if empty == "exclude" else np.ones(image_dice.shape)
        per_image, image_counts = _weighted_mean(image_dice, cw * counted)  # [B]
        dice, any_image = _weighted_mean(per_image, image_counts.astype(np.float64), axis=0)
        dice_loss = 1.0 - dice if any_image else 0.0
        class_mean, class_counted = _weighted_mean(image_dice, counted, axis=0)
        dice_per_class = np.where(class_counted, class_mean, np.nan)
        # Each counted image's (1 - its Dice) split over its classes, averaged over images.
        mask = cw * counted
        shares = safe_ratio(mask * (1.0 - image_dice), mask.sum(axis=1, keepdims=True), 0.0)
        dice_part = shares[image_counts].sum(axis=0) / max(int(image_counts.sum()), 1)

    tp = totals[:, HARD_TP]
    iou = safe_ratio(tp, totals[:, HARD_PRED] + totals[:, HARD_LABEL] - tp, 1.0)
    total = ce_weight * ce + dice_weight * dice_loss
    return CombineResult(float(total), float(ce), float(dice_loss), ce_per_class,
                         dice_per_class, iou, ce_weight * ce_part + dice_weight * dice_part)


def combine_grad(stats, *, ce_weight=1.0, dice_weight=1.0, dice_mode="batch", smooth=1e-5,
                 empty="include", class_weights=None):
    """d total / d stats, [B, C, 8] float64, for the columns that depend on the logits
    (ce_sum, intersection, pred_sum); the other columns are left 0."""
    s = _as_float64(stats)
    cw = _options(s.shape[1], class_weights, dice_mode, empty)
    grad = np.zeros_like(s)

    _, _, ce_mask, weight_sum = _ce_part(s, cw)
    ce_norm = ce_mask.sum()
    if ce_norm > 0:  # CE = sum_c m_c (sum_b ce_sum[b, c] / W_c) / sum_c m_c
        grad[..., CE_SUM] = ce_weight * safe_ratio(ce_mask, weight_sum * ce_norm, 0.0)[None, :]

    if dice_mode == "batch":
        totals = s.sum(axis=0)
        _, d_inter, d_pred = _dice_parts(totals, smooth)
        class_mask = cw * (totals[:, LABEL_SUM] > 0) if empty == "exclude" else cw
        norm = class_mask.sum()
        # dice_loss = 1 - sum_c m_c D_c / sum_c m_c; I_c and P_c sum over the batch.
        factor = -dice_weight * class_mask / norm if norm > 0 else np.zeros_like(cw)
        grad[..., INTERSECTION] = (factor * d_inter)[None, :]
        grad[..., PRED_SUM] = (factor * d_pred)[None, :]
    else:
        _, d_inter, d_pred = _dice_parts(s, smooth)                      # [B, C]
        counted = (s[..., LABEL_SUM] > 0) if empty == "exclude" else np.ones(d_inter.shape)
        class_mask = cw * counted
        per_image_norm = class_mask.sum(axis=1, keepdims=True)          # [B, 1]
        image_used = (per_image_norm > 0).astype(np.float64)
        images = image_used.sum()
        if images > 0:
            factor = (-dice_weight * image_used / images
                      * safe_ratio(class_mask, per_image_norm, 0.0))
            grad[..., INTERSECTION] = factor * d_inter
            grad[..., PRED_SUM] = factor * d_pred
    return grad


# ----------------------------------------------------------------------------------------
# Overlap variants of the Dice term, written from their definitions with plain loops

def overlap_index(i, p, z, smooth, overlap, alpha=0.5, beta=0.5):
    """One class's index from its sums (1 where the denominator is 0)."""
    if overlap == "dice":
        numerator, denominator = 2 * i + smooth, p + z + smooth
    elif overlap == "jaccard":
        numerator, denominator = i + smooth, p + z - i + smooth
    elif overlap == "tversky":
        numerator, denominator = i + smooth, i + alpha * (p - i) + beta * (z - i) + smooth
    else:
        raise ValueError(overlap)
    return numerator / denominator if denominator != 0 else 1.0


def generalized_dice(sums, cw, smooth):
    """GD of one set of per-class sums [C, 8] (Sudre et al. 2017, with MONAI's rule for
    classes with no label: they take the largest weight of the others)."""
    z = sums[:, LABEL_SUM]
    v = [1.0 / zc ** 2 if zc > 0 else None for zc in z]
    largest = max([x for x in v if x is not None], default=0.0)
    w = np.array([largest if x is None else x for x in v]) * cw
    numerator = 2 * np.sum(w * sums[:, INTERSECTION]) + smooth
    denominator = np.sum(w * (sums[:, PRED_SUM] + z)) + smooth
    return numerator / denominator if denominator != 0 else 1.0


def overlap_loss(stats, *, overlap, dice_mode="batch", smooth=1e-5, empty="include",
                 class_weights=None, alpha=0.5, beta=0.5):
    """(the overlap term 1 − mean index or 1 − GD, the index per class [C]) in float64."""
    s = _as_float64(stats)
    classes = s.shape[1]
    cw = np.ones(classes) if class_weights is None else _as_float64(class_weights)

    def mean_loss(sums):  # one image (per_image) or the batch totals (batch): loss or None
        if overlap == "generalized_dice":
            return 1.0 - generalized_dice(sums, cw, smooth)
        keep = [c for c in range(classes) if cw[c] > 0 and
                (empty == "include" or sums[c, LABEL_SUM] > 0)]
        if not keep:
            return None
        index = [overlap_index(*sums[c, [INTERSECTION, PRED_SUM, LABEL_SUM]], smooth, overlap,
                               alpha, beta) for c in keep]
        return 1.0 - np.sum(cw[keep] * index) / np.sum(cw[keep])

    kind = "dice" if overlap == "generalized_dice" else overlap
    totals = s.sum(axis=0)
    batch_index = np.array([overlap_index(*totals[c, [INTERSECTION, PRED_SUM, LABEL_SUM]],
                                          smooth, kind, alpha, beta) for c in range(classes)])
    if dice_mode == "batch":
        loss = mean_loss(totals)
        return (0.0 if loss is None else loss), batch_index
    losses = [mean_loss(image) for image in s]
    losses = [x for x in losses if x is not None]
    per_class = batch_index.copy()
    for c in range(classes):
        images = [b for b in range(s.shape[0]) if empty == "include" or s[b, c, LABEL_SUM] > 0]
        if images:
            per_class[c] = np.mean([overlap_index(*s[b, c, [INTERSECTION, PRED_SUM, LABEL_SUM]],
                                                  smooth, kind, alpha, beta) for b in images])
    return (float(np.mean(losses)) if losses else 0.0), per_class
