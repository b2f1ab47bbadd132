"""`segloss_stats`: the one dispatch between the fused op, the XLA custom call and the reference.

    segloss_stats(...) -> _inputs.prepare (every static check, once)
                       -> fused TF op       outside XLA, library loaded
                       |  XLA custom call   inside XLA-compiled code (_xla.py)
                       |  reference         pure TF: library unavailable, or asked for
                       -> [B, C, 8] float32, then `combine` turns it into the loss.

The gradient of the fused op is registered here, once; the XLA path carries its own
(a tf.custom_gradient in _xla.py, since a custom call is not a TF op).
"""
import tensorflow as tf

from . import _inputs, _loader, _xla, reference

_OP_TYPE = "FusedSeglossStats"
_GRAD_OP_TYPE = "FusedSeglossStatsGrad"


def library():
    """The loaded op module (its ops: fused_segloss_stats, fused_segloss_stats_grad), or None."""
    return _loader.status().module


def fused_available():
    """Whether the compiled op library is loaded (else every call uses the reference).

    Returns:
      bool. When False, `fused_segloss._loader.status().reason` says why.

    >>> import fused_segloss as fsl
    >>> isinstance(fsl.fused_available(), bool)
    True
    """
    return _loader.status().available


def _choose_path(implementation):
    _inputs.check_choice("implementation", implementation, _inputs.IMPLEMENTATIONS)
    if implementation == "reference":
        return "reference"
    if not fused_available():
        if implementation == "fused":
            raise RuntimeError(
                f"implementation='fused' was requested but the op library is unavailable: "
                f"{_loader.status().reason}. Build it with: {_loader.BUILD_COMMAND}")
        _loader.warn_fallback_once()
        return "reference"
    if _xla.in_xla_context():
        return "xla" if _xla.available() else "reference"
    return "fused"


def segloss_stats(logits, labels, weights=None, pos_weight=None, *,
                  data_format="channels_last", squared=False, implementation="auto",
                  check_numerics=False, focal_gamma=0.0, focal_alpha=None,
                  activation="sigmoid", ignore_index=None):
    """Per-image, per-class sums [B, C, 8] in one pass over the data.

    Formula, activation="sigmoid" (per element, p = sigmoid(x), k = 2 if `squared` else 1,
    ce = pos_weight[c]·z·softplus(-x) + (1 - z)·softplus(x), and the focal factor
    f = a_t·(1 - p_t)^γ with p_t = z·p + (1 - z)·(1 - p), a_t = z·α + (1 - z)·(1 - α)
    (a_t = 1 when `focal_alpha` is None; f = 1 by default)); each column sums over the
    spatial positions of one image and class:

        ce_sum = Σ w·f·ce   weight_sum = Σ w     intersection = Σ w·p·z
        pred_sum = Σ w·p^k  label_sum = Σ w·z^k
        hard_tp = Σ w·[x > 0]·[z ≥ 0.5]   hard_pred = Σ w·[x > 0]   hard_label = Σ w·[z ≥ 0.5]

    Formula, activation="softmax" (one class per pixel: p_c = softmax(x)_c over the class
    axis; z_c = [c = y] for sparse class ids y; a pixel whose id is `ignore_index` has
    w = 0 for every class; focal factor f_c = (1 - p_c)^γ):

        ce_sum = Σ w·z·f·(-log p)   weight_sum = Σ w·z   intersection = Σ w·p·z
        pred_sum = Σ w·p^k          label_sum = Σ w·z^k
        hard_tp = Σ w·[argmax x = c]·[z ≥ 0.5]   hard_pred = Σ w·[argmax x = c]
        hard_label = Σ w·[z ≥ 0.5]                (argmax ties: the lowest index)

    Args:
      logits: [B, *S, C] (channels_last) or [B, C, *S] (channels_first), 0 to 3 spatial
        dims; float16, bfloat16, float32 or float64. The only differentiable input.
      labels: sigmoid: the logits' shape; a float dtype with values in [0, 1], or uint8,
        int32, int64 (0/1) or bool. softmax: the same dense forms (soft or one-hot), or
        sparse class ids (uint8, int32, int64) of shape [B, *S] (the logits' shape without
        the class axis) or with a class axis of size 1 ([B, *S, 1] channels_last,
        [B, 1, *S] channels_first); ids lie in [0, C) or equal `ignore_index`.
      weights: optional, broadcasts to the logits' shape (e.g. [B, *S, 1] per pixel);
        finite and >= 0; w = 0 removes an element from every sum.
      pos_weight: optional [C], finite and >= 0: multiplies the positive CE term (sigmoid
        only; with softmax use combine's class_weights).
      data_format: "channels_last" (default) or "channels_first".
      squared: use p² and z² in pred_sum / label_sum (the squared Dice denominator).
      implementation: "auto" (fused op, XLA custom call inside XLA, reference without the
        library), "fused" (error without the library) or "reference".
      check_numerics: raise InvalidArgumentError on NaN/Inf logits instead of
        propagating them.
      focal_gamma: γ >= 0 (finite), the focal focusing exponent of ce_sum; 0 with
        `focal_alpha` None is the plain cross-entropy. With no weights and pos_weight this
        is Keras' BinaryFocalCrossentropy(from_logits=True, gamma=γ) per element.
        With softmax and one-hot labels: Keras' CategoricalFocalCrossentropy(
        from_logits=True, alpha=1, gamma=γ) per pixel.
      focal_alpha: None, or α in [0, 1]: the class-balancing weight a_t of ce_sum (Keras'
        apply_class_balancing=True, alpha=α). Sigmoid only.
      activation: "sigmoid" (default: independent classes, multi-label) or "softmax"
        (mutually exclusive classes).
      ignore_index: None, or an int: sparse labels with this id are left out of every
        sum (softmax with sparse labels only).

    Returns:
      float32 [B, C, 8]; columns in the order of `fused_segloss.STAT_COLUMNS`.

    Raises:
      ValueError: a static problem (rank, shape, dtype, option), naming the argument;
        pos_weight or focal_alpha with softmax; ignore_index with sigmoid or dense labels.
      tf.errors.InvalidArgumentError: a data problem found while running (labels
        outside [0, 1], class ids outside [0, C) other than ignore_index, negative or
        non-finite weights), naming the argument.
      RuntimeError: implementation="fused" without the compiled library.

    >>> import numpy as np, fused_segloss as fsl
    >>> logits = np.zeros([1, 4, 2], np.float32)          # p = 0.5 everywhere
    >>> labels = np.array([[[1, 0]] * 4], np.float32)      # class 0 everywhere
    >>> fsl.segloss_stats(logits, labels)[0, :, :5].numpy().round(3)
    array([[2.773, 4.   , 2.   , 2.   , 4.   ],
           [2.773, 4.   , 0.   , 2.   , 0.   ]], dtype=float32)
    >>> ids = np.array([[0, 0, 1, 2]])                      # softmax: sparse class ids
    >>> s = fsl.segloss_stats(logits, ids, activation="softmax", ignore_index=2)
    >>> s[0, :, :5].numpy().round(3)                        # p = 1/2, pixel 3 ignored
    array([[1.386, 2.   , 1.   , 1.5  , 2.   ],
           [0.693, 1.   , 0.5  , 1.5  , 1.   ]], dtype=float32)
    """
    p = _inputs.prepare(logits, labels, weights, pos_weight, data_format, squared,
                        focal_gamma, focal_alpha, activation, ignore_index)
    if not isinstance(check_numerics, bool):
        raise ValueError(f"`check_numerics` must be a bool, got {check_numerics!r}")
    path = _choose_path(implementation)
    if path == "xla":  # the kernel counts non-finite logits (CheckNumerics compiles away)
        return _xla.stats(p, check_numerics=check_numerics)
    if check_numerics:
        p = p._replace(logits=tf.debugging.check_numerics(
            p.logits, "fused_segloss: `logits` contain NaN or Inf (check_numerics=True)"))
    if path == "reference":
        return reference.stats_from_prepared(p)
    return library().fused_segloss_stats(
        p.logits, p.labels, _inputs.canonical_weights(p), _inputs.pos_weight_or_empty(p),
        data_format=p.data_format, squared=p.squared, **_inputs.focal_attrs(p),
        **_inputs.activation_attrs(p))


@tf.RegisterGradient(_OP_TYPE)
def _stats_grad(op, grad_stats):
    """One fused backward pass; labels, weights and pos_weight get no gradient."""
    logits, labels, weights, pos_weight = op.inputs
    grad_logits = library().fused_segloss_stats_grad(
        logits, labels, weights, pos_weight, grad_stats,
        data_format=op.get_attr("data_format"), squared=op.get_attr("squared"),
        focal_gamma=op.get_attr("focal_gamma"), focal_alpha=op.get_attr("focal_alpha"),
        activation=op.get_attr("activation"), has_ignore_index=op.get_attr("has_ignore_index"),
        ignore_index=op.get_attr("ignore_index"))
    return [grad_logits, None, None, None]


@tf.RegisterGradient(_GRAD_OP_TYPE)
def _no_second_order(op, grad):
    raise NotImplementedError(
        f"Second-order gradients of fused_segloss are not implemented: the op {_GRAD_OP_TYPE} "
        "(gradient of FusedSeglossStats) has no gradient. Use implementation='reference' "
        "for higher-order derivatives.")
