"""Softmax mode's combine (CE over labelled pixels, include_background, the overlaps) against
the float64 oracle (tests/numpy_softmax.py), and MONAI's published DiceCELoss / DiceLoss
values reproduced with our API on every path."""
import numpy as np
import pytest
import tensorflow as tf

import fused_segloss as fsl
import numpy_reference as npref
import numpy_softmax as nps
import softmax_helpers as sh


# ----------------------------------------------------------------------------------------
# combine in softmax mode: against the oracle, from oracle statistics (every path shares it)

COMBINE_OPTIONS = [
    {},
    {"dice_mode": "per_image"},
    {"empty": "exclude"},
    {"dice_mode": "per_image", "empty": "exclude", "smooth": 0.0},
    {"class_weights": [0.5, 2.0, 1.0, 0.0], "ce_weight": 0.3, "dice_weight": 2.0},
    {"include_background": False},
    {"include_background": False, "dice_mode": "per_image", "empty": "exclude"},
    {"include_background": False, "class_weights": [3.0, 1.0, 2.0, 1.0], "smooth": 1.0},
]


def _softmax_stats(rng, empty_class=True, ignore_all_of_image=False):
    x = sh.logits(rng, (3, 6, 5, 4))
    ids = sh.ids(rng, (3, 6, 5), 4, ignore_index=9)
    if empty_class:
        ids[ids == 2] = 1                 # class 2 labelled nowhere
        ids[0][ids[0] == 3] = 0           # class 3 absent from image 0
    if ignore_all_of_image:
        ids[1] = 9
    return nps.stats(x, ids, ignore_index=9)


@pytest.mark.parametrize("options", COMBINE_OPTIONS, ids=lambda o: str(o) or "defaults")
def test_combine_matches_the_oracle(options, rng):
    stats = _softmax_stats(rng, ignore_all_of_image=True)
    res = fsl.combine(stats.astype(np.float32), activation="softmax", **options)
    want = nps.combine(stats, **options)
    magnitude = abs(want.ce) + 1.0
    for name in ("total", "ce", "dice_loss"):
        assert float(getattr(res, name)) == pytest.approx(getattr(want, name),
                                                         rel=1e-5, abs=1e-6 * magnitude), name
    for name in ("ce_per_class", "iou_per_class", "loss_per_class"):
        np.testing.assert_allclose(getattr(res, name), getattr(want, name), rtol=1e-5,
                                   atol=1e-6, err_msg=name)
    known = np.isfinite(want.dice_per_class)  # per_image: NaN where no image counts a class
    np.testing.assert_allclose(np.asarray(res.dice_per_class)[known],
                               want.dice_per_class[known], rtol=1e-5, atol=1e-6)
    assert float(tf.reduce_sum(res.loss_per_class)) == pytest.approx(float(res.total), rel=1e-5)


@pytest.mark.parametrize("overlap", ["dice", "jaccard", "tversky", "generalized_dice"])
@pytest.mark.parametrize("dice_mode", ["batch", "per_image"])
@pytest.mark.parametrize("include_background", [True, False])
def test_combine_overlaps_with_include_background(overlap, dice_mode, include_background, rng):
    stats = _softmax_stats(rng)
    tversky = dict(tversky_alpha=0.3, tversky_beta=0.7) if overlap == "tversky" else {}
    cw = np.array([1.0, 2.0, 0.5, 1.0])
    res = fsl.combine(stats.astype(np.float32), activation="softmax", overlap=overlap,
                      dice_mode=dice_mode, class_weights=cw,
                      include_background=include_background, **tversky)
    overlap_cw = cw.copy()
    if not include_background:
        overlap_cw[0] = 0.0
    want_overlap, want_index = npref.overlap_loss(
        stats, overlap=overlap, dice_mode=dice_mode, class_weights=overlap_cw,
        alpha=tversky.get("tversky_alpha", 0.5), beta=tversky.get("tversky_beta", 0.5))
    totals = stats.sum(0)
    want_ce = (cw * totals[:, npref.CE_SUM]).sum() / (cw * totals[:, npref.WEIGHT_SUM]).sum()
    assert float(res.dice_loss) == pytest.approx(want_overlap, rel=1e-5, abs=1e-6)
    assert float(res.ce) == pytest.approx(want_ce, rel=1e-5)
    assert float(res.total) == pytest.approx(want_ce + want_overlap, rel=1e-5)
    if overlap in ("jaccard", "tversky"):
        np.testing.assert_allclose(res.overlap_per_class, want_index, rtol=1e-5, atol=1e-6)


def test_combine_softmax_ce_is_zero_when_every_pixel_is_ignored():
    stats = np.zeros([2, 3, 8], np.float32)
    stats[..., npref.PRED_SUM] = 4.0     # predictions, but no labelled pixel
    res = fsl.combine(stats, activation="softmax")
    assert float(res.ce) == 0.0 and np.isfinite(float(res.total))


def test_include_background_false_keeps_class_0_in_the_ce(rng):
    stats = _softmax_stats(rng, empty_class=False).astype(np.float32)
    with_bg = fsl.combine(stats, activation="softmax")
    without = fsl.combine(stats, activation="softmax", include_background=False)
    assert float(without.ce) == float(with_bg.ce)
    dice = np.asarray(with_bg.dice_per_class)
    assert float(without.dice_loss) == pytest.approx(1.0 - dice[1:].mean(), rel=1e-6)
    assert float(with_bg.dice_loss) == pytest.approx(1.0 - dice.mean(), rel=1e-6)


# ----------------------------------------------------------------------------------------
# MONAI's published values (Project-MONAI/MONAI, tests/losses/test_dice_ce_loss.py and
# tests/losses/test_dice_loss.py). MONAI's layout is [B, C, *S] (channels_first); its
# targets of shape [B, 1, *S] with to_onehot_y=True are class ids with a class axis of size 1.

MONAI_INPUT = np.array([[[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]],
                        [[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]], np.float32)
MONAI_INPUT_100 = np.array([[[100.0, 100.0, 0.0], [0.0, 0.0, 1.0]],
                            [[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]], np.float32)
MONAI_TARGET = np.array([[[0, 0, 1]], [[0, 1, 0]]], np.int64)


@pytest.mark.parametrize("path", sh.PATHS)
@pytest.mark.parametrize("logits, target, options, expected", [
    # DiceCELoss(to_onehot_y=True): 0.3133 = -1 + log(1 + e). Its Dice acts on the raw
    # inputs (MONAI's softmax=False default), which equal the one-hot target here: its
    # Dice term is 0 and 0.3133 is the CE term alone, our total with dice_weight=0.
    (MONAI_INPUT, MONAI_TARGET, {}, 0.3133),
    # to_onehot_y=False, one-hot targets (float and uint8).
    (MONAI_INPUT, MONAI_INPUT, {}, 0.3133),
    (MONAI_INPUT, MONAI_INPUT.astype(np.uint8), {}, 0.3133),
    # include_background=False, weight=[1, 1] (Dice again 0 on the raw inputs).
    (MONAI_INPUT_100, MONAI_TARGET, {"include_background": False,
                                     "class_weights": [1.0, 1.0]}, 0.2088),
    # lambda_ce=2.0
    (MONAI_INPUT_100, MONAI_TARGET, {"include_background": False,
                                     "class_weights": [1.0, 1.0], "ce_weight": 2.0}, 0.4176),
    # weight=[0, 1]: PyTorch's class-weighted CE keeps only class-1 pixels.
    (MONAI_INPUT_100, MONAI_TARGET, {"include_background": False,
                                     "class_weights": [0.0, 1.0]}, 0.3133),
], ids=["dice-ce-ids", "dice-ce-onehot", "dice-ce-onehot-uint8", "no-background",
        "lambda-ce-2", "weight-0-1"])
def test_monai_dice_ce_loss_published_values(logits, target, options, expected, path):
    def ours(x):
        return fsl.seg_loss(x, target, activation="softmax", data_format="channels_first",
                            dice_weight=0.0, implementation=sh.implementation(path), **options)

    # MONAI's tolerance on these 4-digit values: atol = rtol = 1e-4.
    assert float(sh.on_path(ours, path)(tf.constant(logits))) == pytest.approx(
        expected, abs=1e-4, rel=1e-4)


MONAI_DICE_INPUT = np.array([[[-1.0, 0.0, 1.0], [1.0, 0.0, -1.0]],
                             [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]], np.float32)
MONAI_DICE_TARGET = np.array([[[1, 0, 0]], [[1, 1, 0]]], np.int32)


@pytest.mark.parametrize("path", sh.PATHS)
def test_monai_dice_loss_softmax_published_values(path):
    """DiceLoss(include_background=True, to_onehot_y=True, softmax=True, smooth_nr=1e-4,
    smooth_dr=1e-4): 0.383713 with reduction="mean" over the (image, class) pairs
    (MONAI's batch=False is our dice_mode="per_image"), 1.534853 with reduction="sum"."""
    options = dict(activation="softmax", data_format="channels_first", smooth=1e-4,
                   ce_weight=0.0, dice_mode="per_image", implementation=sh.implementation(path))

    def ours(x):
        return fsl.seg_loss(x, MONAI_DICE_TARGET, **options)

    x = tf.constant(MONAI_DICE_INPUT)
    assert float(sh.on_path(ours, path)(x)) == pytest.approx(0.383713, rel=1e-5)
    if path != "xla":
        per_image = fsl.keras.SegLoss(reduction="none", **options)(MONAI_DICE_TARGET, x)
        classes = MONAI_DICE_INPUT.shape[1]  # each image's loss is its mean over classes
        assert float(tf.reduce_sum(per_image)) * classes == pytest.approx(1.534853, rel=1e-5)


@pytest.mark.parametrize("path", sh.PATHS)
def test_ignore_index_equals_cropping_the_ignored_pixels(path, rng):
    """As MONAI's DiceLoss(ignore_index=2) test: ignored rows count like absent rows."""
    x = sh.logits(rng, (2, 4, 5, 3))
    ids = sh.ids(rng, (2, 4, 5), 3)
    ids[:, 2:] = 7

    def loss(logits, labels, **ignore):
        return fsl.seg_loss_result(logits, labels, activation="softmax", dice_mode="per_image",
                                   implementation=sh.implementation(path), **ignore)

    full = sh.on_path(lambda v: loss(v, ids, ignore_index=7), path)(tf.constant(x))
    crop = sh.on_path(lambda v: loss(v, ids[:, :2]), path)(tf.constant(x[:, :2]))
    for a, b in zip(full, crop):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
