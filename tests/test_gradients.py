"""Gradients of segloss_stats and of the loss, fused and reference, against float64 NumPy
plus a finite-difference check and the gradient's contract (dtype, None for
labels / weights / pos_weight, no silent second-order gradient)."""
import numpy as np
import pytest
import tensorflow as tf

import fused_segloss as fsl
import numpy_reference as npref

IMPLEMENTATIONS = ("fused", "reference")


def _per_element(values_bc, prob):
    """A [B, C] array broadcast against the logits' layout."""
    rank = prob.logits.ndim
    if prob.data_format == "channels_last":
        return values_bc.reshape(values_bc.shape[0], *[1] * (rank - 2), values_bc.shape[1])
    return values_bc.reshape(*values_bc.shape, *[1] * (rank - 2))


def naive_rounding_floor(prob, grad_stats, eps):
    """What evaluating p and 1 - p separately in the compute type may lose: TF autodiff of
    sigmoid gives p * (1 - p) with p rounded, i.e. an absolute error up to eps times each
    term's bound (|ce'| <= 1 + pos_weight, p(1-p) <= 1, 2 p p(1-p) <= 2). Admitted for
    the reference only; the fused kernel must be accurate relative to the terms."""
    g = np.abs(np.asarray(grad_stats, np.float64))
    pw = np.ones(g.shape[1]) if prob.pos_weight is None else prob.pos_weight.astype(np.float64)
    bound_bc = g[..., 0] * (1.0 + pw) + g[..., 2] + 2.0 * g[..., 3]
    w = 1.0 if prob.weights is None else prob.weights.astype(np.float64)
    return eps * np.broadcast_to(w * _per_element(bound_bc, prob), prob.logits.shape)


def _stats_and_grad(prob, implementation, upstream=None, combine_options=None):
    """(value, dvalue/dlogits) of the stats (with upstream gradient) or of the total loss."""
    args, kwargs = prob.args()
    logits = tf.constant(prob.logits)
    with tf.GradientTape() as tape:
        tape.watch(logits)
        if combine_options is None:
            value = fsl.segloss_stats(logits, *args[1:], **kwargs, implementation=implementation)
        else:
            value = fsl.seg_loss(logits, *args[1:], **kwargs, **combine_options,
                                 implementation=implementation)
    return value, tape.gradient(value, logits, output_gradients=upstream)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_stats_gradient_matches_numpy(oracle_case, implementation, problem, rng, check):
    """Upstream gradient on all 8 columns: columns 1 and 4-7 must contribute nothing."""
    prob = problem(**oracle_case.problem)
    args, kwargs = prob.args()
    dtype = check.dtype_name(prob.logits)
    stats_shape = npref.stats(*args, **kwargs).shape
    upstream = rng.normal(0.0, 1.0, stats_shape).astype(np.float32)
    _, grad = _stats_and_grad(prob, implementation, upstream=tf.constant(upstream))
    expected = npref.logit_grad(*args, grad_stats=upstream, **kwargs)
    scale = npref.logit_grad_scale(*args, grad_stats=upstream, **kwargs)
    floor = (naive_rounding_floor(prob, upstream, check.COMPUTE_EPS[dtype])
             if implementation == "reference" else None)
    check.grad(grad.numpy(), expected, scale, dtype, floor=floor)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_loss_gradient_matches_numpy(oracle_case, implementation, problem, check):
    prob = problem(**oracle_case.problem)
    options = {k: v for k, v in oracle_case.combine.items() if k != "class_weights"}
    args, kwargs = prob.args()
    dtype = check.dtype_name(prob.logits)
    _, grad = _stats_and_grad(prob, implementation, combine_options=options)
    upstream = npref.combine_grad(npref.stats(*args, **kwargs), **options)
    expected = npref.logit_grad(*args, grad_stats=upstream, **kwargs)
    scale = npref.logit_grad_scale(*args, grad_stats=upstream, **kwargs)
    # The upstream gradient comes from float32 combine arithmetic on float32 stats: a
    # Dice derivative -(2I + s) / (P + Z + s)^2 carries the error of I once and of the
    # denominator twice (3x the stats' error), plus a few float32 roundings.
    extra = 3 * check.stats_rtol(prob, implementation) + 8 * 2.0 ** -24
    floor = (naive_rounding_floor(prob, upstream, check.COMPUTE_EPS[dtype])
             if implementation == "reference" else None)
    check.grad(grad.numpy(), expected, scale, dtype, extra_rtol=extra, floor=floor)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("options", [
    dict(data_format="channels_last", weights="pixel", pos_weight=True),
    dict(data_format="channels_first", weights="full", squared=True, soft=True),
    dict(data_format="channels_last", spatial=(), weights="class", squared=True),
], ids=["last-pixel-pos_weight", "first-full-squared-soft", "last-rank0-class-squared"])
def test_numerical_gradient_float64(options, implementation, problem, rng):
    """Central differences (tf.test.compute_gradient, delta 1e-3) of a float64 scalar
    sum(G * stats) over every column, with float64 logits kept > delta away from x = 0
    (where the hard columns jump)."""
    prob = problem(logits_dtype="float64", **{"spatial": (3,), **options})
    x = np.where(np.abs(prob.logits) < 0.05, 0.5, prob.logits)
    args, kwargs = prob.args()
    stats = npref.stats(x, *args[1:], **kwargs)
    upstream = rng.normal(0.0, 1.0, stats.shape)

    def scalar(logits):
        out = fsl.segloss_stats(logits, *args[1:], **kwargs, implementation=implementation)
        return tf.reduce_sum(tf.cast(out, tf.float64) * upstream)

    delta = 1e-3
    theoretical, numerical = tf.test.compute_gradient(scalar, [tf.constant(x)], delta=delta)
    # The stats are float32 even for float64 logits: each of the two evaluations rounds
    # every entry by up to 2^-24 relative, so a difference quotient of element i (class c
    # of image b) carries up to 2^-24 * sum_k |G[b,c,k] S[b,c,k]| / delta of noise.
    noise_bc = 2.0 ** -24 * np.abs(upstream * stats).sum(axis=-1) / delta
    noise = np.broadcast_to(_per_element(noise_bc, prob), x.shape).reshape(-1)
    difference = np.abs(theoretical[0].reshape(-1) - numerical[0].reshape(-1))
    allowed = 2.0 * noise + 1e-5 * np.abs(theoretical[0].reshape(-1)) + 1e-9
    assert (difference <= allowed).all(), (difference - allowed).max()
    assert np.abs(theoretical[0]).max() > 1e-2  # the check compared something


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_only_logits_get_a_gradient(implementation, problem):
    """labels, weights and pos_weight get None, on every path, so that a
    model whose soft labels or weights come from another network trains the same way
    whether the fused op or the fallback runs."""
    prob = problem(weights="pixel", pos_weight=True, soft=True)
    tensors = [tf.constant(a) for a in (prob.logits, prob.labels, prob.weights, prob.pos_weight)]
    with tf.GradientTape() as tape:
        tape.watch(tensors)
        loss = fsl.seg_loss(*tensors, implementation=implementation)
    grads = tape.gradient(loss, tensors)
    assert grads[0] is not None and grads[0].dtype == tf.float32
    names = ("labels", "weights", "pos_weight")
    got = [name for name, g in zip(names, grads[1:]) if g is not None]
    assert not got, f"{implementation}: gradients flow into {got}"


def test_second_order_gradient_names_the_op(problem):
    prob = problem()
    logits = tf.constant(prob.logits)
    with pytest.raises(Exception, match="FusedSeglossStatsGrad "):
        with tf.GradientTape() as outer:
            outer.watch(logits)
            with tf.GradientTape() as inner:
                inner.watch(logits)
                loss = fsl.seg_loss(logits, prob.labels, implementation="fused")
            grad = inner.gradient(loss, logits)
        outer.gradient(grad, logits)


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
@pytest.mark.parametrize("options", [
    dict(spatial=(1023,), classes=3, weights="pixel", soft=True, pos_weight=True),
    dict(spatial=(7,), classes=100, weights="full", logits_dtype="float16", squared=True),
    dict(spatial=(5,), classes=1, weights="image", logits_dtype="bfloat16", extreme=True),
    dict(spatial=(7,), classes=4, logits_dtype="float64", labels_dtype="bool", squared=True),
], ids=["f32-pixel", "f16-full-C100", "bf16-image-C1", "f64-none"])
def test_core_module_logit_grad_matches_numpy(options, data_format, problem, rng, check):
    from fused_segloss import _core

    prob = problem(data_format=data_format, **options)
    args, kwargs = prob.args()
    upstream = rng.normal(0.0, 1.0, npref.stats(*args, **kwargs).shape).astype(np.float32)
    weights = None if prob.weights is None else prob.weights.reshape(
        [1] * (3 - prob.weights.ndim) + list(prob.weights.shape))
    expected = npref.logit_grad(*args, grad_stats=upstream, **kwargs)
    scale = npref.logit_grad_scale(*args, grad_stats=upstream, **kwargs)
    for threads in (1, 3):
        grad = _core.logit_grad(prob.logits, prob.labels, weights, prob.pos_weight, upstream,
                                channels_last=data_format == "channels_last",
                                squared=prob.squared, threads=threads)
        check.grad(grad, expected, scale, check.dtype_name(prob.logits),
                   what=f"threads={threads}")
