"""segloss_stats and the loss built on it, fused and reference, against float64 NumPy.

The matrix (conftest.ORACLE_CASES) covers layouts, spatial ranks 0-3, dtypes,
weights broadcast kinds, pos_weight, squared, odd sizes, C = 1 / 100, empty classes, soft
labels and logits ±1e4. Tolerances are explained in conftest.py.
"""
import numpy as np
import pytest
import tensorflow as tf

import fused_segloss as fsl
import numpy_reference as npref

IMPLEMENTATIONS = ("fused", "reference")
F32_EPS = 2.0 ** -24


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_stats_match_numpy(oracle_case, implementation, problem, check):
    prob = problem(**oracle_case.problem)
    args, kwargs = prob.args()
    stats = fsl.segloss_stats(*args, **kwargs, implementation=implementation)
    assert stats.dtype == tf.float32
    expected = npref.stats(*args, **kwargs)
    check.stats(stats.numpy(), expected, check.dtype_name(prob.logits),
                rtol=check.stats_rtol(prob, implementation))


def _combine_options(options, classes, rng):
    options = dict(options)
    if options.get("class_weights") == "random":
        weights = rng.uniform(0.0, 2.0, classes).astype(np.float32)
        weights[0] = 0.0  # a class that counts for nothing
        weights[-1] = 1.5  # a positive sum even for C = 1
        options["class_weights"] = weights
    return options


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_loss_terms_match_numpy(oracle_case, implementation, problem, rng, check):
    prob = problem(**oracle_case.problem)
    args, kwargs = prob.args()
    classes = prob.logits.shape[-1 if prob.data_format == "channels_last" else 1]
    options = _combine_options(oracle_case.combine, classes, rng)
    result = fsl.seg_loss_result(*args, **kwargs, **options, implementation=implementation)
    expected = npref.combine(npref.stats(*args, **kwargs), **options)

    # Each term is a ratio of at most two sums per class (2x the stats' error, doubled
    # again for the float32 arithmetic of combine), measured against the size of the terms
    # added: ce for the CE term, 1 + dice for 1 - dice.
    stats_rtol = check.stats_rtol(prob, implementation)
    rtol = 4 * stats_rtol + 16 * F32_EPS
    ce_weight, dice_weight = options.get("ce_weight", 1.0), options.get("dice_weight", 1.0)
    check.loss(result.total, expected.total, ce_weight * expected.ce + 2 * dice_weight, rtol)
    check.loss(result.ce, expected.ce, expected.ce, rtol)
    check.loss(result.dice_loss, expected.dice_loss, 2.0, rtol)
    assert float(result.total) == pytest.approx(
        ce_weight * float(result.ce) + dice_weight * float(result.dice_loss), rel=1e-6, abs=1e-7)
    for name in ("ce_per_class", "dice_per_class", "iou_per_class", "loss_per_class"):
        actual = getattr(result, name).numpy()
        wanted = getattr(expected, name)
        assert actual.shape == (classes,), (name, actual.shape)
        counted = np.isfinite(wanted)  # per_image Dice of a class no image counts: unspecified
        assert np.isfinite(actual).all(), (name, actual)
        np.testing.assert_allclose(actual[counted], wanted[counted], rtol=rtol, err_msg=name)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
def test_float16_subnormal_logits_count_as_positive(implementation, data_format):
    """float16 values below 6.1e-5 are subnormal in float16 but ordinary float32 numbers:
    x = 3e-5 > 0 must count as a hard positive and move p above 0.5 like any other value."""
    values = np.array([6e-8, -6e-8, 3e-5, -3e-5, 6.1e-5, 1.0, 0.0, -1.0], np.float16)
    assert (np.abs(values[:4].astype(np.float32)) < 6.1e-5).all()
    x = values.reshape(1, 8, 1)
    if data_format == "channels_first":
        x = x.reshape(1, 1, 8)
    z = np.ones_like(x, dtype=np.float32)
    stats = fsl.segloss_stats(x, z, data_format=data_format,
                              implementation=implementation).numpy()[0, 0]
    expected = npref.stats(x, z, data_format=data_format)[0, 0]
    assert stats[npref.HARD_PRED] == expected[npref.HARD_PRED] == 4.0
    assert stats[npref.HARD_TP] == 4.0
    np.testing.assert_allclose(stats, expected, rtol=2e-7)


# The pybind11 module runs the same core kernels on NumPy arrays, with weights given in the
# canonical rank-3 view ([Bw, N or 1, Cw] channels_last, [Bw, Cw, N or 1] channels_first).
CORE_CASES = [
    dict(spatial=(1023,), classes=3, weights="pixel", logits_dtype="float32", soft=True),
    dict(spatial=(7,), classes=100, weights="full", logits_dtype="float16",
         labels_dtype="uint8", pos_weight=True, squared=True),
    dict(spatial=(1,), classes=1, weights="image", logits_dtype="bfloat16",
         labels_dtype="bool", extreme=True),
    dict(spatial=(7,), classes=5, weights="spatial", logits_dtype="float64",
         labels_dtype="float16", soft=True, pos_weight=True),
    dict(spatial=(40000,), classes=2, weights=None, logits_dtype="float32", extreme=True),
]


def canonical_weights(prob):
    """Rank-3 [Bw, Nw, Cw] / [Bw, Cw, Nw] view of a rank-1 problem's weights."""
    if prob.weights is None:
        return None
    return prob.weights.reshape([1] * (3 - prob.weights.ndim) + list(prob.weights.shape))


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
@pytest.mark.parametrize("options", CORE_CASES, ids=lambda o: "-".join(
    f"{k}={v}" for k, v in o.items() if k in ("classes", "weights", "logits_dtype")))
def test_core_module_stats_match_numpy(options, data_format, problem, check):
    from fused_segloss import _core

    prob = problem(data_format=data_format, **options)
    args, kwargs = prob.args()
    expected = npref.stats(*args, **kwargs)
    for threads in (1, 3):
        stats = _core.stats(prob.logits, prob.labels, canonical_weights(prob), prob.pos_weight,
                            channels_last=data_format == "channels_last", squared=prob.squared,
                            threads=threads)
        assert stats.dtype == np.float32 and stats.shape == expected.shape
        check.stats(stats, expected, check.dtype_name(prob.logits), what=f"threads={threads}")


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
def test_confident_cross_entropy_keeps_its_small_terms(data_format):
    """Without pos_weight the forward pass uses ce = (max(x, 0) - z·x) + log1p(exp(-|x|))
    (segloss_math.h). Every element here is confidently right (|x| in [8, 30], label 1 for
    x > 0 and 0 for x < 0), so each ce is about exp(-|x|) and the sum is tiny. A
    form that subtracts after adding the log term, e.g. softplus(x) - z·x, rounds most of
    those terms to 0 at float32 (ulp(30) = 1.9e-6 against exp(-30) = 9e-14). The sums must
    match float64 NumPy closely, with pos_weight omitted (the short form) and given as ones
    (the general form)."""
    from fused_segloss import _core

    rng = np.random.default_rng(7)
    shape = (2, 4099, 3)  # odd positions: partial vectors at row ends too
    magnitude = rng.uniform(8.0, 30.0, shape)
    positive = rng.random(shape) < 0.5
    x = np.where(positive, magnitude, -magnitude).astype(np.float32)
    z = positive.astype(np.float32)
    if data_format == "channels_first":
        x, z = np.ascontiguousarray(x.transpose(0, 2, 1)), np.ascontiguousarray(z.transpose(0, 2, 1))
    expected = npref.stats(x.astype(np.float64), z.astype(np.float64), data_format=data_format)
    for pos_weight in (None, np.ones(3, np.float32)):
        stats = _core.stats(x, z, None, pos_weight, channels_last=data_format == "channels_last",
                            squared=False, threads=1)
        np.testing.assert_allclose(stats[..., npref.CE_SUM], expected[..., npref.CE_SUM],
                                   rtol=1e-5, err_msg=f"pos_weight={pos_weight}")
