"""The pure-TF formulation of segloss_stats: the test oracle and the automatic fallback.

Plain TensorFlow ops, differentiated by TF autodiff, written for clarity rather than speed. Internals are float32 (float64
for float64 logits); the result is float32 [B, C, 8].
"""
import tensorflow as tf

from . import _inputs


def check_values(p):
    """tf.debugging assertions with the kernels' wording (shapes known only at run time,
    labels in [0, 1], weights and pos_weight finite and >= 0)."""
    labels, weights = p.labels, p.weights
    checks = []
    if not (p.logits.shape.is_fully_defined() and labels.shape.is_fully_defined()):
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
    if labels.dtype != tf.bool:
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


def segloss_stats(logits, labels, weights=None, pos_weight=None, *,
                  data_format="channels_last", squared=False, validate=True,
                  focal_gamma=0.0, focal_alpha=None):
    """[B, C, 8] float32 statistics computed with plain TF ops."""
    p = _inputs.prepare(logits, labels, weights, pos_weight, data_format, squared,
                        focal_gamma, focal_alpha)
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
        z = tf.stop_gradient(tf.cast(p.labels, compute))
    w = tf.ones_like(x) if p.weights is None else tf.broadcast_to(
        tf.stop_gradient(tf.cast(p.weights, compute)), tf.shape(x))
    class_shape = [-1] + [1] * (p.rank - 1 - p.class_axis)  # broadcasts along the class axis
    pw = 1.0 if p.pos_weight is None else tf.reshape(
        tf.stop_gradient(tf.cast(p.pos_weight, compute)), class_shape)

    prob = tf.sigmoid(x)
    ce = pw * z * tf.nn.softplus(-x) + (1.0 - z) * tf.nn.softplus(x)
    if _inputs.focal_enabled(p):
        ce = focal_factor(x, z, p.focal_gamma, p.focal_alpha) * ce
    k = 2.0 if p.squared else 1.0
    pred_hard = tf.stop_gradient(tf.cast(x > 0, compute))
    label_hard = tf.cast(z >= 0.5, compute)
    columns = [w * ce, w, w * prob * z, w * prob ** k, w * z ** k,
               w * pred_hard * label_hard, w * pred_hard, w * label_hard]
    sums = [tf.reduce_sum(col, axis=p.spatial_axes) for col in columns]  # each [B, C]
    return tf.cast(tf.stack(sums, axis=-1), tf.float32)
