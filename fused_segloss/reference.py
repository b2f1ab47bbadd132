"""The pure-TF formulation of segloss_stats: the test oracle and the automatic fallback.

Plain TensorFlow ops, differentiated by TF autodiff, written for clarity rather than speed. Internals are float32 (float64
for float64 logits); the result is float32 [B, C, 8]. Both activations: sigmoid
(independent classes, `_sigmoid_elements`) and softmax (one class per pixel,
`_softmax_elements`), which build the same eight per-element columns.
"""
import tensorflow as tf

from . import _inputs, _xla


def check_values(p):
    """tf.debugging assertions with the kernels' wording (shapes known only at run time,
    labels in [0, 1] or class ids in [0, C), weights and pos_weight finite and >= 0)."""
    labels, weights = p.labels, p.weights
    checks = []
    if not (p.logits.shape.is_fully_defined() and labels.shape.is_fully_defined()):
        if p.sparse:
            logit_dims = tf.shape(p.logits)
            checks.append(tf.debugging.assert_equal(
                tf.shape(labels), tf.gather(logit_dims, p.label_axes),
                message="`labels` (class ids) shape must be the `logits` shape without the "
                        "class axis"))
        else:
            checks.append(tf.debugging.assert_equal(
                tf.shape(labels), tf.shape(p.logits),
                message="`labels` shape must equal the `logits` shape"))
        checks.append(tf.debugging.assert_positive(
            tf.shape(p.logits)[p.class_axis],
            message="`logits` must have at least one class (C >= 1)"))
    if p.pos_weight is not None:
        checks.append(tf.debugging.Assert(
            tf.reduce_all((p.pos_weight >= 0.0) & (p.pos_weight <= 3.0e38)),
            ["`pos_weight` must be finite and >= 0"]))
    if p.sparse:
        if not _xla.in_xla_context():  # XLA drops assertions (and compiles no strings)
            checks.append(_check_class_ids(p))
    elif labels.dtype != tf.bool:
        z = tf.cast(labels, tf.float32)
        checks.append(tf.debugging.Assert(
            tf.reduce_all((z >= 0.0) & (z <= 1.0)),
            ["`labels` must lie in [0, 1] (uint8 labels must be 0 or 1); found values outside "
             "that range or NaN"]))
    if weights is not None:
        checks.append(tf.debugging.Assert(
            tf.reduce_all((weights >= 0.0) & (weights <= 3.0e38)),
            ["`weights` must be finite and >= 0; found negative, infinite or NaN values"]))
    return checks


def _check_class_ids(p):
    """Sparse ids in [0, C) or equal to ignore_index, in the kernels' wording."""
    ids = tf.cast(p.labels, tf.int64)
    classes = tf.shape(p.logits, out_type=tf.int64)[p.class_axis]
    bad = (ids < 0) | (ids >= classes)
    template = "`labels` class ids must lie in [0, C) = [0, {})"
    if p.ignore_index is not None:
        bad &= ids != p.ignore_index
        template += f" or equal ignore_index = {p.ignore_index}"
    found = tf.strings.format(
        template + "; found {} id(s) outside, from {} to {}",
        [classes, tf.reduce_sum(tf.cast(bad, tf.int64)),
         tf.reduce_min(tf.where(bad, ids, ids.dtype.max)),
         tf.reduce_max(tf.where(bad, ids, ids.dtype.min))])
    return tf.debugging.Assert(tf.logical_not(tf.reduce_any(bad)), [found])


def segloss_stats(logits, labels, weights=None, pos_weight=None, *,
                  data_format="channels_last", squared=False, validate=True,
                  focal_gamma=0.0, focal_alpha=None, activation="sigmoid", ignore_index=None):
    """[B, C, 8] float32 statistics computed with plain TF ops (arguments as
    `fused_segloss.segloss_stats`)."""
    p = _inputs.prepare(logits, labels, weights, pos_weight, data_format, squared,
                        focal_gamma, focal_alpha, activation, ignore_index)
    return stats_from_prepared(p, validate=validate)


def focal_factor(x, z, gamma, alpha):
    """a_t·(1 - p_t)^gamma, p_t = z·p + (1 - z)·(1 - p), a_t = z·alpha + (1 - z)·(1 - alpha).

    log(1 - p_t) = log(z·sigmoid(-x) + (1 - z)·sigmoid(x)) as a log-sum-exp of log-sigmoids:
    finite, with a finite autodiff gradient, for any logit and label (1 - p_t -> 0 included).
    """
    terms = tf.stack([tf.math.log(z) + tf.math.log_sigmoid(-x),
                      tf.math.log(1.0 - z) + tf.math.log_sigmoid(x)], axis=0)
    factor = tf.exp(gamma * tf.reduce_logsumexp(terms, axis=0))
    if alpha is not None:
        factor = (z * alpha + (1.0 - z) * (1.0 - alpha)) * factor
    return factor


def stats_from_prepared(p: "_inputs.Prepared", validate=True):
    compute = tf.float64 if p.logits.dtype == tf.float64 else tf.float32
    deps = check_values(p) if validate else []
    with tf.control_dependencies(deps):  # every input waits for the checks
        x = tf.cast(p.logits, compute)
        # Only the logits are differentiable, as in the fused op.
        labels = tf.stop_gradient(p.labels if p.sparse else tf.cast(p.labels, compute))
    w = tf.ones_like(x) if p.weights is None else tf.broadcast_to(
        tf.stop_gradient(tf.cast(p.weights, compute)), tf.shape(x))
    elements = _softmax_elements if p.activation == "softmax" else _sigmoid_elements
    z, w, ce, prob, pred_hard = elements(p, x, labels, w)
    k = 2.0 if p.squared else 1.0
    label_hard = tf.cast(z >= 0.5, compute)
    columns = [w * ce, w * (z if p.activation == "softmax" else 1.0), w * prob * z,
               w * prob ** k, w * z ** k, w * pred_hard * label_hard, w * pred_hard,
               w * label_hard]
    sums = [tf.reduce_sum(col, axis=p.spatial_axes) for col in columns]  # each [B, C]
    return tf.cast(tf.stack(sums, axis=-1), tf.float32)


def _sigmoid_elements(p, x, z, w):
    """(z, w, ce, p, [x > 0]) per element for independent classes."""
    class_shape = [-1] + [1] * (p.rank - 1 - p.class_axis)  # broadcasts along the class axis
    pw = 1.0 if p.pos_weight is None else tf.reshape(
        tf.stop_gradient(tf.cast(p.pos_weight, x.dtype)), class_shape)
    ce = pw * z * tf.nn.softplus(-x) + (1.0 - z) * tf.nn.softplus(x)
    if _inputs.focal_enabled(p):
        ce = focal_factor(x, z, p.focal_gamma, p.focal_alpha) * ce
    return z, w, ce, tf.sigmoid(x), tf.stop_gradient(tf.cast(x > 0, x.dtype))


def _softmax_elements(p, x, labels, w):
    """(z, w, ce, p, [argmax x = c]) per element for one class per pixel.

    z_c is one-hot of the class id for sparse labels (a pixel whose id is ignore_index
    gets w = 0 for every class); ce_c = z_c·(−log p_c)·(1 − p_c)^γ, so that column 0
    holds Σ w z (−log p) and column 1 (w·z) the labelled weight of each class.
    """
    axis, classes = p.class_axis, tf.shape(x)[p.class_axis]
    if p.sparse:
        ids = tf.cast(labels, tf.int64)
        z = tf.one_hot(ids, classes, axis=axis, dtype=x.dtype)  # out-of-range ids: all 0
        if p.ignore_index is not None:
            w = w * tf.expand_dims(tf.cast(ids != p.ignore_index, x.dtype), axis)
    else:
        z = labels
    log_p = tf.nn.log_softmax(x, axis=axis)
    ce = -log_p
    if p.focal_gamma != 0.0:  # γ = 0: exactly the plain cross-entropy
        ce = softmax_focal_factor(x, axis, p.focal_gamma) * ce
    top = tf.argmax(x, axis=axis)  # ties: the lowest index, as the kernels
    pred_hard = tf.one_hot(top, classes, axis=axis, dtype=x.dtype)
    return z, w, z * ce, tf.exp(log_p), pred_hard


def softmax_focal_factor(x, axis, gamma):
    """(1 − p_c)^γ, p = softmax(x) along `axis`, finite with a finite autodiff gradient.

    1 − p_c = Σ_{j≠c} e_j / Σ_j e_j with e = exp(x − max x). For a class that is not the
    pixel's argmax, Σ_{j≠c} e_j = total − e_c ≥ total / 2 (no cancellation); for the
    argmax the other terms are summed directly. Where 1 − p_c is 0 (C = 1, or every
    other class underflows) the factor is 0 with gradient 0, the limit of the focal term.
    """
    e = tf.exp(x - tf.stop_gradient(tf.reduce_max(x, axis=axis, keepdims=True)))
    total = tf.reduce_sum(e, axis=axis, keepdims=True)
    is_top = tf.one_hot(tf.argmax(x, axis=axis), tf.shape(x)[axis], axis=axis,
                        on_value=True, off_value=False)
    others_of_top = tf.reduce_sum(tf.where(is_top, tf.zeros_like(e), e), axis=axis,
                                  keepdims=True)
    others = tf.where(is_top, others_of_top + tf.zeros_like(e), total - e)
    positive = others > 0
    log_rest = tf.math.log(tf.where(positive, others, tf.ones_like(others))) - tf.math.log(total)
    return tf.where(positive, tf.exp(gamma * log_rest), tf.zeros_like(others))
