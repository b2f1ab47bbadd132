"""Numerics: valid input never gives NaN or Inf; NaN/Inf
logits propagate like TensorFlow's own sigmoid cross-entropy unless check_numerics=True.

Every test runs on the three code paths: the fused TF op, the pure-TF reference and the
XLA path (tf.function(jit_compile=True)). Values are compared with the float64 NumPy
oracle (tests/numpy_reference.py) or with TF's own ops; README.md, "Errors and numerics" states the contract.
"""
import itertools

import numpy as np
import pytest
import tensorflow as tf

import fused_segloss as fsl
import numpy_reference as npref

PATHS = ("fused", "reference", "xla")
IAE = tf.errors.InvalidArgumentError
MODES = [dict(dice_mode=m, empty=e, smooth=s)
         for m, e, s in itertools.product(("batch", "per_image"), ("include", "exclude"),
                                          (1e-5, 0.0))]
RESULT_FIELDS = fsl.SegLossResult._fields
# A loss from float32 stats (each within 2e-5 relative of the exact sums, conftest
# STATS_RTOL) through combine's float32 arithmetic: a Dice ratio carries the error of its
# numerator and denominator, 1 - Dice and the class means add a few 2^-24. 1e-4 relative
# to the size of the terms leaves a 2x margin over that sum.
LOSS_RTOL = 1e-4


def run(path, x, z, w=None, pw=None, *, data_format="channels_last", check_numerics=False,
        **options):
    """stats, every SegLossResult field and d total / d logits, as NumPy, on one path."""
    if path == "fused" and not fsl.fused_available():
        pytest.skip("the op library is not built")
    implementation = "reference" if path == "reference" else "auto"

    def compute(x, z, w, pw):
        with tf.GradientTape() as tape:
            tape.watch(x)
            stats = fsl.segloss_stats(x, z, w, pw, data_format=data_format,
                                      implementation=implementation,
                                      check_numerics=check_numerics)
            result = fsl.combine(stats, **options)
        return (stats, *result, tape.gradient(result.total, x))

    if path == "xla":
        compute = tf.function(compute, jit_compile=True)
    tensors = [None if a is None else tf.convert_to_tensor(a) for a in (x, z, w, pw)]
    values = [np.asarray(v) for v in compute(*tensors)]
    return dict(zip(("stats", *RESULT_FIELDS, "grad"), values))


def modes_for(path):
    # combine is the same pure TF on every path; inside XLA each option set is one more
    # compilation, so two opposite sets are enough there.
    return MODES if path != "xla" else [MODES[1], MODES[-2]]


def assert_all_finite(out, where):
    bad = [k for k, v in out.items() if not np.isfinite(np.asarray(v, np.float64)).all()]
    assert not bad, f"non-finite {bad} for {where}"


def assert_total_matches_oracle(out, x, z, w, pw, options, data_format="channels_last"):
    expected = npref.combine(npref.stats(x, z, w, pw, data_format), **options)
    magnitude = abs(expected.ce) * options.get("ce_weight", 1.0) + 1.0
    assert abs(float(out["total"]) - expected.total) <= LOSS_RTOL * magnitude, \
        (options, float(out["total"]), expected.total)


# ------------------------------------------------------------------- extreme finite logits
EXTREMES = np.array([1e4, -1e4, 200.0, -200.0, 90.0, -90.0, 30.0, -30.0, 0.0, 1e-3])


def extreme_problem(dtype, data_format):
    rng = np.random.default_rng(3)
    shape = (2, 5, 7, 3)
    x = rng.choice(EXTREMES, shape)
    ordinary = rng.random(shape) < 0.3
    x[ordinary] = rng.normal(0.0, 3.0, int(ordinary.sum()))
    z = rng.random(shape)
    z[rng.random(shape) < 0.3] = 1.0
    z[rng.random(shape) < 0.3] = 0.0
    w = rng.uniform(0.0, 2.0, (2, 5, 7, 1))
    w[rng.random(w.shape) < 0.2] = 0.0
    if data_format == "channels_first":
        x, z, w = (np.moveaxis(a, -1, 1) for a in (x, z, w))
    dtypes = {"float16": np.float16, "bfloat16": tf.bfloat16.as_numpy_dtype,
              "float32": np.float32, "float64": np.float64}
    pw = np.array([0.5, 1.0, 4.0], np.float32)
    return (np.ascontiguousarray(x).astype(dtypes[dtype]), np.ascontiguousarray(z, np.float32),
            np.ascontiguousarray(w, np.float32), pw)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "bfloat16"])
@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
def test_extreme_logits_give_finite_loss_and_gradient(path, dtype, data_format):
    x, z, w, pw = extreme_problem(dtype, data_format)
    for options in modes_for(path):
        out = run(path, x, z, w, pw, data_format=data_format, **options)
        assert_all_finite(out, (path, dtype, options))
        assert out["grad"].dtype == x.dtype
        assert_total_matches_oracle(out, x, z, w, pw, options, data_format)


@pytest.mark.parametrize("path", PATHS)
def test_ce_at_extreme_logits_equals_tf_sigmoid_cross_entropy(path):
    """No weights, no pos_weight: CE is tf.reduce_mean(sigmoid_cross_entropy_with_logits),
    also at ±1e4, and its gradient is TF's autodiff gradient of that mean."""
    rng = np.random.default_rng(4)
    x = rng.choice(EXTREMES, (3, 40, 2)).astype(np.float32)
    z = rng.random((3, 40, 2)).astype(np.float32)
    out = run(path, x, z, dice_weight=0.0)
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        tf_ce = tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(z, xt))
    tf_grad = tape.gradient(tf_ce, xt).numpy()
    keras_ce = tf.keras.losses.BinaryCrossentropy(from_logits=True)(z, x).numpy()
    # float32 sums of ~240 terms of up to 1e4 (a few ulp each) on both sides.
    np.testing.assert_allclose(out["ce"], tf_ce.numpy(), rtol=1e-5)
    np.testing.assert_allclose(out["ce"], keras_ce, rtol=1e-5)
    # Per element the gradient is (p - z) / N; both sides round p and the quotient once.
    np.testing.assert_allclose(out["grad"], tf_grad, rtol=0, atol=4 * 2.0 ** -24 / x.size)


# ------------------------------------------------------------------- infinite and NaN logits
def single_element_images(values, labels):
    """Each (logit, label) pair as its own image: [B, 1, 1], so ce_sum[b] is one element."""
    x = np.array(values, np.float32).reshape(-1, 1, 1)
    z = np.array(labels, np.float32).reshape(-1, 1, 1)
    return x, z


INF_GRID = list(itertools.product([np.inf, -np.inf], [0.0, 0.5, 1.0]))


@pytest.mark.parametrize("path", PATHS)
def test_infinite_logits_are_non_finite_exactly_where_tf_is(path):
    """±inf logits are outside the math's domain: the CE term is NaN or +inf exactly where
    tf.nn.sigmoid_cross_entropy_with_logits is non-finite (README.md, "Errors and numerics" lists which of the
    two); every other statistic, and the gradient, stay finite, as TF's autodiff does."""
    grid = INF_GRID + [(3.0, 1.0), (-2.0, 0.0)]
    x, z = single_element_images(*zip(*grid))
    tf_ce = tf.nn.sigmoid_cross_entropy_with_logits(z, x).numpy().reshape(-1)
    out = run(path, x, z)
    ce_sum = out["stats"][:, 0, 0]
    np.testing.assert_array_equal(np.isfinite(ce_sum), np.isfinite(tf_ce))
    assert np.isfinite(out["stats"][:, :, 1:]).all()
    assert not np.isfinite(out["total"])
    assert np.isfinite(out["grad"]).all()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("logit", [np.nan, np.inf, -np.inf])
def test_a_single_non_finite_logit_makes_the_loss_non_finite(path, logit):
    # Even at a weight-0 (ignored) element, as with tf.reduce_sum(w * sigmoid_ce): 0 * NaN.
    rng = np.random.default_rng(5)
    x = rng.normal(0.0, 2.0, (2, 6, 3)).astype(np.float32)
    z = (rng.random((2, 6, 3)) < 0.5).astype(np.float32)
    z[1, 4, 2] = 0.5  # makes the CE term of ±inf non-finite for either sign
    x[1, 4, 2] = logit
    w = np.ones((2, 6, 1), np.float32)
    w[1, 4] = 0.0
    out = run(path, x, z, w)
    assert not np.isfinite(out["total"])
    if np.isnan(logit):
        assert np.isnan(out["total"])
        ce_finite = np.isfinite(out["stats"][..., 0])
        assert not ce_finite[1, 2] and ce_finite.sum() == ce_finite.size - 1


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("logit", [np.nan, np.inf, -np.inf])
def test_check_numerics_raises_on_nan_or_inf_logits(path, logit):
    x = np.zeros((2, 5, 3), np.float32)
    x[0, 3, 1] = logit
    z = np.ones((2, 5, 3), np.float32)
    with pytest.raises(IAE) as info:
        run(path, x, z, check_numerics=True)
    assert "`logits`" in str(info.value) and "NaN or Inf" in str(info.value)


@pytest.mark.parametrize("path", PATHS)
def test_check_numerics_does_not_change_finite_results(path):
    x, z, w, pw = extreme_problem("float32", "channels_last")
    checked = run(path, x, z, w, pw, check_numerics=True)
    plain = run(path, x, z, w, pw)
    for key in plain:
        np.testing.assert_array_equal(checked[key], plain[key], err_msg=key)


# ------------------------------------------------------------------- ignored and empty
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
def test_all_ignored_batch_gives_finite_zero_loss(path, data_format):
    rng = np.random.default_rng(6)
    shape = (2, 4, 5, 3) if data_format == "channels_last" else (2, 3, 4, 5)
    x = rng.normal(0.0, 3.0, shape).astype(np.float32)
    z = (rng.random(shape) < 0.5).astype(np.float32)
    w = np.zeros((2, 4, 5, 1) if data_format == "channels_last" else (2, 1, 4, 5), np.float32)
    for options in modes_for(path):
        out = run(path, x, z, w, data_format=data_format, **options)
        assert_all_finite(out, (path, options))
        np.testing.assert_array_equal(out["stats"], 0.0)
        expected = npref.combine(npref.stats(x, z, w, None, data_format), **options)
        assert expected.total == 0.0
        # Dice is s / s here; XLA may compute a quotient as s * (1 / s), which is 1 within
        # a float32 ulp (measured: 1 - D = -2.98e-8), so it gets 2 ulp of 1.0 around 0.
        tolerance = 2 * 2.0 ** -23 if path == "xla" else 0.0
        assert abs(float(out["total"])) <= tolerance, (options, float(out["total"]))
        np.testing.assert_array_equal(out["grad"], 0.0)


@pytest.mark.parametrize("path", PATHS)
def test_an_all_ignored_class_leaves_the_ce_mean(path):
    rng = np.random.default_rng(8)
    x = rng.normal(0.0, 3.0, (2, 9, 3)).astype(np.float32)
    z = (rng.random((2, 9, 3)) < 0.5).astype(np.float32)
    w = np.array([0.0, 1.0, 2.0], np.float32)  # class 0 ignored everywhere
    for options in modes_for(path):
        out = run(path, x, z, w, **options)
        assert_all_finite(out, (path, options))
        assert out["ce_per_class"][0] == 0.0
        expected = npref.combine(npref.stats(x, z, w), **options)
        np.testing.assert_allclose(out["ce"], expected.ce, rtol=LOSS_RTOL)
        assert_total_matches_oracle(out, x, z, w, None, options)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("empty_classes", ["one", "all"])
@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
def test_empty_classes_in_every_mode(path, empty_classes, data_format):
    """A class with no positive label, in every empty/dice_mode combination, smooth 1e-5
    and 0: finite loss, per-class vectors and gradient; the loss and gradient match the
    oracle (the gradient through numpy_reference.combine_grad and logit_grad)."""
    rng = np.random.default_rng(9)
    shape = (3, 6, 5, 4)
    x = rng.normal(0.0, 3.0, shape).astype(np.float32)
    z = (rng.random(shape) < 0.4).astype(np.float32)
    if empty_classes == "one":
        z[..., 1] = 0.0
        z[0, ..., 2] = 0.0  # empty in one image only: matters in per_image mode
    else:
        z[...] = 0.0
    if data_format == "channels_first":
        x, z = (np.ascontiguousarray(np.moveaxis(a, -1, 1)) for a in (x, z))
    for options in modes_for(path):
        out = run(path, x, z, data_format=data_format, **options)
        assert_all_finite(out, (path, empty_classes, options))
        assert_total_matches_oracle(out, x, z, None, None, options, data_format)
        if path == "reference":
            continue  # its autodiff gradient is checked in test_gradients.py
        stats64 = npref.stats(x, z, data_format=data_format)
        upstream = npref.combine_grad(stats64, **options)
        expected = npref.logit_grad(x, z, grad_stats=upstream, data_format=data_format)
        scale = npref.logit_grad_scale(x, z, grad_stats=upstream, data_format=data_format)
        # float32 upstream from float32 stats (3x their 2e-5, see test_gradients.py) plus
        # the kernel's 1e-5 relative to the terms' magnitude.
        excess = np.abs(out["grad"] - expected) - ((6e-5 + 1e-5) * scale + 1e-30)
        assert (excess <= 0).all(), (options, float(excess.max()))


@pytest.mark.parametrize("path", PATHS)
def test_empty_class_with_vanishing_predictions_and_smooth_zero_is_finite(path):
    """Z = 0 and p ~ 0 with smooth = 0: Dice is 0/0-like. Whether P is exactly 0 (D := 1)
    or a denormal-sized positive number (D = 0) depends on where each path's sigmoid
    underflows, so only finiteness is guaranteed here (README.md, "Errors and numerics")."""
    x = np.full((2, 5, 2), -1e4, np.float32)
    x[..., 1] = np.random.default_rng(10).normal(0.0, 2.0, (2, 5))
    z = np.zeros((2, 5, 2), np.float32)
    z[..., 1] = 1.0
    for options in modes_for(path):
        out = run(path, x, z, **{**options, "smooth": 0.0})
        assert_all_finite(out, (path, options))
        assert 0.0 <= out["dice_per_class"][0] <= 1.0


# ------------------------------------------------------------------- accumulation accuracy
@pytest.mark.parametrize("shape, data_format, weight", [
    ((1, 32768, 1), "channels_last", np.full((1,), 0.98345864, np.float32)),
    ((2, 4100, 17), "channels_last", np.linspace(0.05, 2.0, 17, dtype=np.float32)),
    ((1, 3, 40000), "channels_first", np.array([[0.98345864], [0.1], [1.7]], np.float32)),
], ids=["C1-one-item", "C17-class-weights", "channels_first"])
def test_long_sums_of_constant_weights_stay_within_the_stats_tolerance(shape, data_format,
                                                                       weight, check):
    """The same value added thousands of times is the worst case for float32 running sums
    (every rounding has the same sign); weight_sum and the hard counts then have an exact
    expected value. They must stay within conftest's STATS_RTOL like every other sum."""
    if not fsl.fused_available():
        pytest.skip("the op library is not built")
    x = np.full(shape, 2.0, np.float32)  # p > 0.5 and x > 0 everywhere
    z = np.ones(shape, np.float32)
    stats = fsl.segloss_stats(x, z, weight, data_format=data_format).numpy()
    expected = npref.stats(x, z, weight, None, data_format)
    check.stats(stats, expected, "float32")


# ------------------------------------------------------------------- the deferred log term
# Without weights or pos_weight the CPU forward sums each accumulator's log1p(exp(-|x|))
# terms as one run (segloss_math.h, Log1pProductStep) and takes one log per block. These
# are the inputs that could break it: confident, correct predictions, where 1 + e rounds
# to 1 in float32 (|x| > 16.6) and a product of the (1 + e) would drop every term; x = 0,
# where each factor is 2 and a run of 120 rows reaches 2^120; one value repeated, so that
# the roundings share a sign.
@pytest.mark.parametrize("shape, data_format", [
    ((1, 32768, 1), "channels_last"),     # 120-row blocks, one class
    ((2, 4100, 5), "channels_last"),
    ((1, 3, 40000), "channels_first"),
], ids=["C1", "C5", "channels_first"])
@pytest.mark.parametrize("logit", [0.0, 2.0, -5.0, 17.0, -20.0, 30.0, "confident"])
def test_deferred_log_terms_keep_tiny_and_large_runs_within_the_stats_tolerance(
        shape, data_format, logit, check):
    if not fsl.fused_available():
        pytest.skip("the op library is not built")
    rng = np.random.default_rng(11)
    if logit == "confident":  # |x| ~ 12 +- 3 with the matching label: ce ~ 1e-5 .. 1e-9
        x = rng.normal(12.0, 3.0, shape) * rng.choice([-1.0, 1.0], shape)
    else:
        x = np.full(shape, logit)
    z = (x > 0).astype(np.float32)  # the correct label: ce is the log term alone for x != 0
    x = x.astype(np.float32)
    unweighted = fsl.segloss_stats(x, z, data_format=data_format).numpy()
    expected = npref.stats(x, z, None, None, data_format)
    check.stats(unweighted, expected, "float32")
    # The weighted kernel keeps a log per element: with weights of 1 it is an independent
    # evaluation of the same sums.
    ones = np.ones((shape[0], 1, 1), np.float32)
    weighted = fsl.segloss_stats(x, z, ones, data_format=data_format).numpy()
    check.stats(unweighted, weighted.astype(np.float64), "float32")
