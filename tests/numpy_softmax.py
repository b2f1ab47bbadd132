"""An independent float64 NumPy oracle of softmax mode (one class per pixel): the
statistics, their gradient and the softmax `combine`, written from the README's semantics
table, not from the package.

    stats(logits, labels, weights, data_format, squared, ignore_index, focal_gamma) -> [B, C, 8]
    logit_grad(logits, labels, weights, grad_stats, ...)  -> the logits' shape
    combine(stats, include_background=True, **options)    -> numpy_reference.CombineResult

Labels are dense (the logits' shape) or sparse class ids (the logits' shape without the
class axis). The gradient goes through the full softmax Jacobian dp_c/dx_j = p_c(δ_cj - p_j)
and the derivative of each term with respect to p (not through the kernels' closed form).
"""
import numpy as np

import numpy_reference as ref


def softmax(x):
    """Softmax over the last axis, float64, stable."""
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def elements(logits, labels, weights, data_format, ignore_index):
    """float64 x, z, w viewed as [B, N, C] (channels last), ignored pixels given w = 0."""
    x = ref.to_channels_last(np.asarray(logits).astype(np.float64), data_format)
    classes = x.shape[-1]
    labels = np.asarray(labels)
    w = np.ones_like(x)
    if weights is not None:
        w = ref.to_channels_last(
            np.broadcast_to(np.asarray(weights, np.float64),
                            np.shape(logits)), data_format).copy()
    if labels.ndim == x.ndim - 1:  # sparse class ids
        ids = labels.astype(np.int64)
        keep = np.ones(ids.shape) if ignore_index is None else (ids != ignore_index)
        valid = (ids >= 0) & (ids < classes)
        if np.any(~valid & (keep > 0)):
            raise ValueError("class id outside [0, C)")
        z = np.eye(classes)[np.where(valid, ids, 0)] * valid[..., None]
        w = w * keep[..., None]
    else:
        z = ref.to_channels_last(labels.astype(np.float64), data_format)
    batch = x.shape[0]
    return tuple(a.reshape(batch, -1, classes) for a in (x, z, w))


def stats(logits, labels, weights=None, data_format="channels_last", squared=False,
          ignore_index=None, focal_gamma=0.0):
    x, z, w = elements(logits, labels, weights, data_format, ignore_index)
    k = 2.0 if squared else 1.0
    p = softmax(x)
    log_p = x - x.max(axis=-1, keepdims=True)
    log_p = log_p - np.log(np.exp(log_p).sum(axis=-1, keepdims=True))
    ce = -log_p * (1.0 - p) ** focal_gamma
    pred = np.eye(x.shape[-1])[np.argmax(x, axis=-1)]  # argmax: first index on ties
    lab = (z >= 0.5).astype(np.float64)
    columns = [w * z * ce, w * z, w * z * p, w * p ** k, w * z ** k,
               w * pred * lab, w * pred, w * lab]
    return np.stack([c.sum(axis=1) for c in columns], axis=-1)


def logit_grad(logits, labels, weights=None, grad_stats=None, data_format="channels_last",
               squared=False, ignore_index=None, focal_gamma=0.0):
    x, z, w = elements(logits, labels, weights, data_format, ignore_index)
    g = np.asarray(grad_stats, np.float64)
    g_ce, g_inter, g_pred = (g[:, None, :, col] for col in (ref.CE_SUM, ref.INTERSECTION,
                                                            ref.PRED_SUM))
    p = softmax(x)
    gamma = focal_gamma
    # d/dp of (1 - p)^gamma·(-log p); the p -> 1 limit of the first part is 0 for gamma > 0.
    with np.errstate(divide="ignore", invalid="ignore"):
        first = np.where(p < 1.0, -gamma * (1.0 - p) ** (gamma - 1.0) * -np.log(p), 0.0)
    d_ce = first - (1.0 - p) ** gamma / p
    k = 2.0 if squared else 1.0
    d_p = w * (g_ce * z * d_ce + g_inter * z + g_pred * k * p ** (k - 1.0))   # dL/dp_c
    # dL/dx_j = Σ_c dL/dp_c · p_c(δ_cj - p_j)
    jac = p[..., :, None] * (np.eye(x.shape[-1]) - p[..., None, :])          # [.., c, j]
    grad = np.einsum("bnc,bncj->bnj", d_p, jac)
    shape_last = ref.to_channels_last(np.empty(np.shape(logits), np.uint8), data_format).shape
    return ref.from_channels_last(grad.reshape(shape_last), data_format)


def combine(stats, *, ce_weight=1.0, dice_weight=1.0, dice_mode="batch", smooth=1e-5,
            empty="include", class_weights=None, include_background=True):
    """Softmax combine: CE = Σ_c cw_c ce_sum_c / Σ_c cw_c weight_sum_c over the batch; the
    Dice term as the sigmoid one, class 0 left out of its mean when include_background is
    False (by a zero class weight in the Dice mean only)."""
    s = np.asarray(stats, np.float64)
    classes = s.shape[1]
    cw = np.ones(classes) if class_weights is None else np.asarray(class_weights, np.float64)
    totals = s.sum(axis=0)
    denominator = (cw * totals[:, ref.WEIGHT_SUM]).sum()
    ce = (cw * totals[:, ref.CE_SUM]).sum() / denominator if denominator > 0 else 0.0
    dice_cw = cw.copy()
    if not include_background:
        dice_cw[0] = 0.0
    dice_only = ref.combine(s, ce_weight=0.0, dice_weight=1.0, dice_mode=dice_mode,
                            smooth=smooth, empty=empty, class_weights=dice_cw)
    ce_per_class = ref.safe_ratio(totals[:, ref.CE_SUM], totals[:, ref.WEIGHT_SUM], 0.0)
    ce_share = ref.safe_ratio(cw * totals[:, ref.CE_SUM], denominator, 0.0)
    total = ce_weight * ce + dice_weight * dice_only.dice_loss
    return ref.CombineResult(float(total), float(ce), dice_only.dice_loss, ce_per_class,
                             dice_only.dice_per_class, dice_only.iou_per_class,
                             ce_weight * ce_share + dice_weight * dice_only.loss_per_class)
