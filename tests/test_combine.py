"""combine(): every option against numpy_reference.combine, the zero-denominator rules
(defined values and gradients, never NaN), and the SegLossResult fields."""
import itertools

import numpy as np
import pytest
import tensorflow as tf

import fused_segloss as fsl
import numpy_reference as npref

B, C = 3, 5
IGNORED, EMPTY, EMPTY_IN_IMAGE_0 = 1, 2, 3  # class roles in realistic_stats()
# combine works in float32 on float32 stats given to both sides: a few roundings per term.
RTOL = 4e-6


def realistic_stats(rng, batch=B):
    """float32 [B, C, 8] from real data, with an all-ignored class (weight 0 everywhere),
    a class with no positive label anywhere, and one empty in image 0 only."""
    x = rng.normal(0.0, 2.0, (batch, 6, 4, C))
    z = (rng.random(x.shape) < 0.4).astype(np.float64)
    z[..., EMPTY] = 0.0
    z[0, ..., EMPTY_IN_IMAGE_0] = 0.0
    w = rng.uniform(0.0, 2.0, x.shape)
    w[..., IGNORED] = 0.0
    return npref.stats(x, z, w).astype(np.float32)


def _class_weights(kind, rng):
    if kind is None:
        return None
    weights = rng.uniform(0.2, 2.0, C).astype(np.float32)
    weights[4] = 0.0
    return weights


def _combine_and_grad(stats, **options):
    stats = tf.constant(stats)
    with tf.GradientTape() as tape:
        tape.watch(stats)
        result = fsl.combine(stats, **options)
    return result, tape.gradient(result.total, stats)


def assert_result_matches(result, expected, magnitude):
    for name in ("total", "ce", "dice_loss"):
        actual = float(getattr(result, name))
        assert np.isfinite(actual), name
        assert abs(actual - getattr(expected, name)) <= RTOL * magnitude, \
            (name, actual, getattr(expected, name))
    for name in ("ce_per_class", "dice_per_class", "iou_per_class", "loss_per_class"):
        actual, wanted = getattr(result, name).numpy(), getattr(expected, name)
        assert actual.dtype == np.float32 and np.isfinite(actual).all(), (name, actual)
        counted = np.isfinite(wanted)  # per_image Dice of a class no image counts
        np.testing.assert_allclose(actual[counted], wanted[counted], rtol=RTOL, atol=1e-7,
                                   err_msg=name)


def assert_grad_matches(grad, expected):
    grad = grad.numpy()
    assert np.isfinite(grad).all()
    for column in (npref.CE_SUM, npref.INTERSECTION, npref.PRED_SUM):
        scale = np.abs(expected[..., column]).max() + 1e-12
        np.testing.assert_allclose(grad[..., column], expected[..., column], rtol=1e-5,
                                   atol=1e-6 * scale, err_msg=npref.STAT_NAMES[column])


OPTION_GRID = [
    dict(dice_mode=mode, empty=empty, smooth=smooth, class_weights=cw,
         ce_weight=ce_weight, dice_weight=dice_weight)
    for (mode, empty, smooth, cw), (ce_weight, dice_weight) in zip(
        itertools.product(("batch", "per_image"), ("include", "exclude"), (1e-5, 0.0, 1.0),
                          (None, "random")),
        itertools.cycle([(1.0, 1.0), (0.25, 3.0), (0.0, 1.0), (2.0, 0.0)]))
]


@pytest.mark.parametrize("options", OPTION_GRID, ids=lambda o: "-".join(
    f"{k}={v}" for k, v in o.items()))
def test_combine_matches_numpy(options, rng):
    stats = realistic_stats(rng)
    options = dict(options, class_weights=_class_weights(options["class_weights"], rng))
    result, grad = _combine_and_grad(stats, **options)
    expected = npref.combine(stats, **options)
    magnitude = options["ce_weight"] * expected.ce + 2.0 * options["dice_weight"] + 1e-6
    assert_result_matches(result, expected, magnitude)
    assert_grad_matches(grad, npref.combine_grad(stats, **options))
    # The classes' parts add up to the total (the report's "share of loss").
    assert float(tf.reduce_sum(result.loss_per_class)) == pytest.approx(
        float(result.total), rel=1e-6, abs=1e-7)


def test_defaults(rng):
    stats = realistic_stats(rng)
    expected = npref.combine(stats, ce_weight=1.0, dice_weight=1.0, dice_mode="batch",
                             smooth=1e-5, empty="include", class_weights=None)
    assert_result_matches(fsl.combine(stats), expected, expected.ce + 2.0)


def test_all_ignored_class_leaves_the_ce_mean(rng):
    """weight_sum = 0: CE_c = 0 and the class drops out of the CE mean (no NaN, and the
    other classes' mean is not diluted)."""
    stats = realistic_stats(rng)
    result, grad = _combine_and_grad(stats, smooth=0.0)
    totals = stats.astype(np.float64).sum(axis=0)
    assert totals[IGNORED, npref.WEIGHT_SUM] == 0
    assert float(result.ce_per_class[IGNORED]) == 0.0
    others = [c for c in range(C) if c != IGNORED]
    per_class = totals[others, npref.CE_SUM] / totals[others, npref.WEIGHT_SUM]
    assert float(result.ce) == pytest.approx(per_class.mean(), rel=RTOL)
    # Its Dice: I = P = Z = 0 with smooth = 0 is 0/0, defined as 1.
    assert float(result.dice_per_class[IGNORED]) == 1.0
    assert np.isfinite(grad.numpy()).all()


def test_empty_class_include_and_exclude(rng):
    stats = realistic_stats(rng)
    include = fsl.combine(stats, empty="include")
    exclude = fsl.combine(stats, empty="exclude")
    # include: an empty class with predictions has Dice s / (P + s) ~ 0 and counts.
    assert float(include.dice_per_class[EMPTY]) < 1e-3
    dice = include.dice_per_class.numpy().astype(np.float64)
    assert float(include.dice_loss) == pytest.approx(1.0 - dice.mean(), rel=RTOL)
    # exclude: the classes with Z = 0 over the batch (EMPTY and IGNORED) leave the mean.
    kept = [c for c in range(C) if c not in (EMPTY, IGNORED)]
    assert float(exclude.dice_loss) == pytest.approx(1.0 - dice[kept].mean(), rel=RTOL)


def test_per_image_exclude_drops_an_image_with_no_class_left(rng):
    stats = realistic_stats(rng)
    stats[0, :, npref.LABEL_SUM] = 0.0  # image 0 has no positive label in any class
    stats[0, :, npref.INTERSECTION] = 0.0
    result, grad = _combine_and_grad(stats, dice_mode="per_image", empty="exclude")
    expected = npref.combine(stats, dice_mode="per_image", empty="exclude")
    assert_result_matches(result, expected, expected.ce + 2.0)
    # Image 0 contributes nothing to the Dice term, so its Dice inputs get no gradient.
    np.testing.assert_array_equal(grad.numpy()[0, :, npref.PRED_SUM], 0.0)
    assert np.isfinite(grad.numpy()).all()


@pytest.mark.parametrize("dice_mode", ["batch", "per_image"])
def test_exclude_with_nothing_left_gives_dice_term_zero(dice_mode, rng):
    stats = realistic_stats(rng)
    stats[..., npref.LABEL_SUM] = 0.0
    stats[..., npref.INTERSECTION] = 0.0
    stats[..., npref.HARD_LABEL] = 0.0
    stats[..., npref.HARD_TP] = 0.0
    result, grad = _combine_and_grad(stats, dice_mode=dice_mode, empty="exclude")
    assert float(result.dice_loss) == 0.0
    assert float(result.total) == pytest.approx(float(result.ce), rel=1e-6)
    assert np.isfinite(grad.numpy()).all()
    np.testing.assert_array_equal(grad.numpy()[..., npref.PRED_SUM], 0.0)


@pytest.mark.parametrize("smooth", [0.0, 1e-5])
def test_zero_dice_denominator_is_one_without_nan(smooth):
    """P + Z + s = 0 (nothing predicted, nothing labelled, smooth 0) gives D = 1."""
    stats = np.zeros((2, 3, 8), np.float32)
    stats[..., npref.WEIGHT_SUM] = 10.0
    stats[..., npref.CE_SUM] = 0.5
    stats[:, 1, npref.PRED_SUM] = 2.0  # class 1 predicts something
    for mode in ("batch", "per_image"):
        result, grad = _combine_and_grad(stats, smooth=smooth, dice_mode=mode)
        dice = result.dice_per_class.numpy()
        assert dice[0] == 1.0 and dice[2] == 1.0
        assert dice[1] == pytest.approx(smooth / (4.0 + smooth) if mode == "batch"
                                        else smooth / (2.0 + smooth), abs=1e-7)
        assert np.isfinite(grad.numpy()).all()
        assert_grad_matches(grad, npref.combine_grad(stats, smooth=smooth, dice_mode=mode))


@pytest.mark.parametrize("options", [
    dict(), dict(dice_mode="per_image"), dict(empty="exclude"),
    dict(dice_mode="per_image", empty="exclude", smooth=0.0)], ids=str)
def test_zero_size_batch(options):
    """B = 0: nothing to average; every term is defined (CE 0, Dice term 0, IoU 1)."""
    stats = np.zeros((0, 4, 8), np.float32)
    result, grad = _combine_and_grad(stats, **options)
    expected = npref.combine(stats, **options)
    assert float(result.total) == expected.total == 0.0
    assert float(result.ce) == 0.0 and float(result.dice_loss) == 0.0
    np.testing.assert_array_equal(result.iou_per_class.numpy(), 1.0)
    for name in ("ce_per_class", "dice_per_class", "iou_per_class", "loss_per_class"):
        assert getattr(result, name).shape == (4,)
        assert np.isfinite(getattr(result, name).numpy()).all(), name
    assert grad.shape == (0, 4, 8)


def test_seg_loss_result_fields(problem):
    prob = problem(classes=4, spatial=(5, 3), weights="pixel", soft=True)
    result = fsl.seg_loss_result(prob.logits, prob.labels, prob.weights, ce_weight=0.7,
                                 dice_weight=1.3)
    assert isinstance(result, fsl.SegLossResult)
    assert result._fields == ("total", "ce", "dice_loss", "ce_per_class", "dice_per_class",
                              "iou_per_class", "loss_per_class", "overlap_per_class")
    for name in ("total", "ce", "dice_loss"):
        value = getattr(result, name)
        assert value.shape == () and value.dtype == tf.float32, name
    for name in ("ce_per_class", "dice_per_class", "iou_per_class", "loss_per_class"):
        value = getattr(result, name)
        assert value.shape == (4,) and value.dtype == tf.float32, name
    assert float(result.total) == pytest.approx(
        0.7 * float(result.ce) + 1.3 * float(result.dice_loss), rel=1e-6)
    loss = fsl.seg_loss(prob.logits, prob.labels, prob.weights, ce_weight=0.7, dice_weight=1.3)
    assert float(loss) == float(result.total)
    # The hard IoU comes from the hard columns summed over the batch.
    totals = npref.stats(prob.logits, prob.labels, prob.weights).sum(axis=0)
    tp, pred, label = (totals[:, col] for col in (npref.HARD_TP, npref.HARD_PRED,
                                                  npref.HARD_LABEL))
    np.testing.assert_allclose(result.iou_per_class.numpy(), tp / (pred + label - tp),
                               rtol=1e-5)
