"""The overlap variants of the Dice term (Jaccard, Tversky, generalized Dice): against a
float64 NumPy oracle written from their definitions, against MONAI's published values,
their gradients against finite differences, and the option checks."""
import itertools

import numpy as np
import pytest
import tensorflow as tf

import fused_segloss as fsl
import numpy_reference as npref
from test_combine import realistic_stats

OVERLAPS = {
    "dice": {},
    "jaccard": {},
    "tversky": dict(tversky_alpha=0.3, tversky_beta=0.7),
    "generalized_dice": {},
}
# combine runs in float32 on float32 stats; the oracle in float64 on the same stats.
RTOL = 1e-5

GRID = [
    (overlap, mode, empty, cw)
    for overlap, mode, empty, cw in itertools.product(
        OVERLAPS, ("batch", "per_image"), ("include", "exclude"), (None, "random"))
    if not (overlap == "generalized_dice" and empty == "exclude")
]


def _params(overlap):
    params = OVERLAPS[overlap]
    return params.get("tversky_alpha", 0.5), params.get("tversky_beta", 0.5)


@pytest.mark.parametrize("overlap,dice_mode,empty,class_weights", GRID,
                         ids=lambda v: str(v))
def test_overlap_matches_the_oracle(overlap, dice_mode, empty, class_weights, rng):
    stats = realistic_stats(rng)
    cw = None if class_weights is None else rng.uniform(0.2, 2.0, stats.shape[1])
    options = dict(dice_mode=dice_mode, empty=empty, class_weights=cw, ce_weight=0.7,
                   dice_weight=1.3, overlap=overlap, **OVERLAPS[overlap])
    result = fsl.combine(stats, **options)
    alpha, beta = _params(overlap)
    want_loss, want_index = npref.overlap_loss(stats, overlap=overlap, dice_mode=dice_mode,
                                               empty=empty, class_weights=cw, alpha=alpha,
                                               beta=beta)
    assert float(result.dice_loss) == pytest.approx(want_loss, rel=RTOL, abs=1e-7)
    np.testing.assert_allclose(result.overlap_per_class, want_index, rtol=RTOL, atol=1e-7)
    total = float(result.total)
    assert total == pytest.approx(0.7 * float(result.ce) + 1.3 * want_loss, rel=RTOL)
    assert float(tf.reduce_sum(result.loss_per_class)) == pytest.approx(total, rel=1e-5)
    # The soft Dice and IoU stay in the report whatever the overlap.
    dice = fsl.combine(stats, dice_mode=dice_mode, empty="include" if overlap ==
                       "generalized_dice" else empty, class_weights=cw)
    np.testing.assert_array_equal(result.dice_per_class, dice.dice_per_class)
    np.testing.assert_array_equal(result.iou_per_class, dice.iou_per_class)


def test_dice_overlap_is_the_default_bit_for_bit(rng):
    stats = realistic_stats(rng)
    for a, b in zip(fsl.combine(stats, overlap="dice"), fsl.combine(stats)):
        np.testing.assert_array_equal(a, b)


def test_tversky_with_half_and_half_is_the_dice(rng):
    stats = realistic_stats(rng)
    dice = fsl.combine(stats, dice_mode="per_image")
    tversky = fsl.combine(stats, dice_mode="per_image", overlap="tversky")
    np.testing.assert_allclose(tversky.dice_loss, dice.dice_loss, rtol=1e-6)


def test_generalized_dice_of_one_class_is_its_dice(rng):
    stats = realistic_stats(rng)[:, 0:1]  # a class with labels in every image
    # smooth 0: GD adds `smooth` to v·(2I) and v·(P + Z), which rescales its share
    gd = fsl.combine(stats, dice_mode="per_image", overlap="generalized_dice", smooth=0.0)
    dice = fsl.combine(stats, dice_mode="per_image", smooth=0.0)
    np.testing.assert_allclose(gd.dice_loss, dice.dice_loss, rtol=1e-6)


@pytest.mark.parametrize("overlap", list(OVERLAPS))
@pytest.mark.parametrize("dice_mode", ["batch", "per_image"])
def test_gradient_matches_finite_differences(overlap, dice_mode, rng):
    """d dice_loss / d (I, P) by TF autodiff against central differences of the float64
    oracle: an independent check of every overlap's derivative."""
    stats = realistic_stats(rng).astype(np.float64)
    stats[..., npref.PRED_SUM] += 1.0  # keep clear of the denominators' zeros
    alpha, beta = _params(overlap)
    options = dict(overlap=overlap, dice_mode=dice_mode, **OVERLAPS[overlap])
    tensor = tf.constant(stats, tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(tensor)
        loss = fsl.combine(tensor, ce_weight=0.0, **options).dice_loss
    grad = tape.gradient(loss, tensor).numpy()
    assert np.isfinite(grad).all()
    step = 1e-4
    for column in (npref.INTERSECTION, npref.PRED_SUM):
        for b, c in itertools.product(range(stats.shape[0]), range(stats.shape[1])):
            up, down = stats.copy(), stats.copy()
            up[b, c, column] += step
            down[b, c, column] -= step
            oracle = [npref.overlap_loss(s, overlap=overlap, dice_mode=dice_mode, alpha=alpha,
                                         beta=beta)[0] for s in (up, down)]
            want = (oracle[0] - oracle[1]) / (2 * step)
            assert grad[b, c, column] == pytest.approx(want, rel=2e-3, abs=2e-6), \
                (npref.STAT_NAMES[column], b, c)


@pytest.mark.parametrize("overlap", ["jaccard", "tversky", "generalized_dice"])
def test_fused_and_reference_paths_agree_through_the_logits(overlap, problem):
    prob = problem(classes=4, spatial=(9, 5), weights="pixel", soft=True)
    results = []
    for implementation in ("fused", "reference"):
        logits = tf.constant(prob.logits)
        with tf.GradientTape() as tape:
            tape.watch(logits)
            loss = fsl.seg_loss(logits, prob.labels, prob.weights, overlap=overlap,
                                dice_mode="per_image", implementation=implementation,
                                **OVERLAPS[overlap])
        results.append((float(loss), tape.gradient(loss, logits).numpy()))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-5)
    np.testing.assert_allclose(results[0][1], results[1][1], rtol=1e-4, atol=1e-7)


# ---------------------------------------------------------------------- MONAI's published values
# MONAI's TverskyLoss and GeneralizedDiceLoss tests (tests/losses/test_tversky_loss.py and
# test_generalized_dice_loss.py, Project-MONAI/MONAI), the cases with sigmoid activation
# and literal inputs, channels_first. MONAI's default `batch=False` is dice_mode
# "per_image" (its mean over images and classes is the mean over images of the class mean
# here, all classes counted); `batch=True` is "batch". Their smooth_nr = smooth_dr is our
# smooth. Their one-hot targets are written out. rtol 1e-4: they print 6 digits and
# compare with rtol 1e-4 (Tversky) and 1e-5 (GD); ours is computed in float32.
_X1 = [[[[1.0, -1.0], [-1.0, 1.0]]]]
_Z1 = [[[[1.0, 0.0], [1.0, 1.0]]]]
_X2 = [[[[1.0, -1.0], [-1.0, 1.0]]], [[[1.0, -1.0], [-1.0, 1.0]]]]
_Z2 = [[[[1.0, 1.0], [1.0, 1.0]]], [[[1.0, 0.0], [1.0, 0.0]]]]
_X3 = [[[-1.0, 0.0, 1.0], [1.0, 0.0, -1.0]], [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]]
_Z3 = [[[0.0, 1.0, 1.0], [1.0, 0.0, 0.0]], [[0.0, 0.0, 1.0], [1.0, 1.0, 0.0]]]  # ids 100, 110

MONAI_CASES = [  # (overlap, options, logits, labels, expected)
    ("tversky", dict(smooth=1e-6), _X1, _Z1, 0.307576),
    ("tversky", dict(smooth=1e-4), _X2, _Z2, 0.416657),
    ("tversky", dict(smooth=1e-4), _X3, _Z3, 0.435050),
    ("tversky", dict(smooth=1e-5, dice_mode="batch"), _X3, _Z3, 0.422979),
    ("tversky", dict(smooth=1e-6, tversky_alpha=0.3, tversky_beta=0.7), _X1, _Z1, 0.3589),
    ("tversky", dict(smooth=1e-6, tversky_alpha=0.7, tversky_beta=0.3), _X1, _Z1, 0.247366),
    ("generalized_dice", dict(smooth=1e-6), _X1, _Z1, 0.307576),
    ("generalized_dice", dict(smooth=1e-4), _X2, _Z2, 0.416597),
    ("generalized_dice", dict(smooth=1e-4), _X3, _Z3, 0.469964),
]


@pytest.mark.parametrize("implementation", ["fused", "reference"])
@pytest.mark.parametrize("overlap,options,logits,labels,expected", MONAI_CASES)
def test_monai_published_values(overlap, options, logits, labels, expected, implementation):
    options = dict(dict(dice_mode="per_image"), **options)
    result = fsl.seg_loss_result(np.array(logits, np.float32), np.array(labels, np.float32),
                                 data_format="channels_first", overlap=overlap, ce_weight=0.0,
                                 implementation=implementation, **options)
    assert float(result.dice_loss) == pytest.approx(expected, rel=1e-4)
    assert float(result.total) == pytest.approx(expected, rel=1e-4)


# ---------------------------------------------------------------------- options
@pytest.mark.parametrize("options,match", [
    (dict(overlap="dice_ce"), "`overlap` must be one of"),
    (dict(overlap="generalized_dice", empty="exclude"), "`empty`='exclude'.*`overlap`"),
    (dict(overlap="dice", tversky_alpha=0.3), "`tversky_alpha`/`tversky_beta`.*`overlap`"),
    (dict(overlap="tversky", tversky_alpha=-0.1), "`tversky_alpha` must be a finite number"),
    (dict(overlap="tversky", tversky_beta=float("nan")), "`tversky_beta` must be a finite"),
])
def test_bad_overlap_options_name_the_arguments(options, match, rng):
    stats = realistic_stats(rng)
    with pytest.raises(ValueError, match=match):
        fsl.combine(stats, **options)
    with pytest.raises(ValueError, match=match):
        fsl.keras.SegLoss(**options)


def test_tversky_with_squared_names_both(problem):
    prob = problem()
    with pytest.raises(ValueError, match="`overlap`='tversky'.*`squared`=True"):
        fsl.seg_loss(prob.logits, prob.labels, overlap="tversky", squared=True)
    with pytest.raises(ValueError, match="`overlap`='tversky'.*`squared`=True"):
        fsl.keras.SegLoss(overlap="tversky", squared=True)


def test_segloss_config_round_trip_keeps_the_overlap(problem):
    prob = problem(classes=3, spatial=(6, 4))
    loss = fsl.keras.SegLoss(overlap="tversky", tversky_alpha=0.2, tversky_beta=0.8,
                             dice_mode="per_image")
    again = fsl.keras.SegLoss.from_config(loss.get_config())
    assert (again.overlap, again.tversky_alpha, again.tversky_beta) == ("tversky", 0.2, 0.8)
    want = fsl.seg_loss(prob.logits, prob.labels, overlap="tversky", tversky_alpha=0.2,
                        tversky_beta=0.8, dice_mode="per_image")
    assert float(again(prob.labels, prob.logits)) == float(want)
    assert float(loss(prob.labels, prob.logits)) == float(want)


@pytest.mark.parametrize("overlap", list(OVERLAPS))
@pytest.mark.parametrize("dice_mode", ["batch", "per_image"])
@pytest.mark.parametrize("focal", [dict(), dict(focal_gamma=2.0, focal_alpha=0.25)],
                         ids=["plain", "focal"])
def test_focal_and_overlap_together_match_the_oracle(focal, dice_mode, overlap, problem):
    """The whole loss, statistics to total, against the float64 oracle for every pairing
    of the focal cross-entropy with an overlap term."""
    prob = problem(classes=4, spatial=(9, 5), weights="pixel", soft=True, pos_weight=True)
    args, kwargs = prob.args()
    options = dict(dice_mode=dice_mode, overlap=overlap, ce_weight=0.6, dice_weight=1.4,
                   **OVERLAPS[overlap])
    result = fsl.seg_loss_result(*args, **kwargs, **focal, **options)
    stats = npref.stats(*args, **kwargs, **focal)
    alpha, beta = _params(overlap)
    want_overlap, _ = npref.overlap_loss(stats, overlap=overlap, dice_mode=dice_mode,
                                         alpha=alpha, beta=beta)
    want = 0.6 * npref.combine(stats, dice_mode=dice_mode).ce + 1.4 * want_overlap
    # float32 statistics (conftest's stats tolerance) through float32 ratios
    assert float(result.total) == pytest.approx(want, rel=1e-4)
