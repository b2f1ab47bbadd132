"""Bad-input battery, softmax mode: class ids out of range (on the fused path, the
reference, inside XLA and through Keras), ignore_index and include_background misused,
sparse label shapes and dtypes that match no accepted form, and the sigmoid-only options.
Each case asserts the error type and that the message names the argument, what was
expected and, for bad ids, their range and C."""
import numpy as np
import pytest

import fused_segloss as fsl

from bad_input_helpers import IAE, Case, X, Z, assert_clear_error, dynamic, keras_loss, stats, xla

_rng = np.random.default_rng(8)
IDS = _rng.integers(0, 3, (2, 4, 4)).astype(np.int32)             # class ids [B, H, W]
IDS[0, 0, 0] = 1                                                   # at least one 1
IDS_3 = np.where(IDS == 1, 3, IDS).astype(np.int32)                # some ids = C
IDS_NEG = np.where(IDS == 1, -1, IDS).astype(np.int64)             # some ids = -1
ID_RANGE = ("`labels`", "class ids must lie in [0, C) = [0, 3)")


def softmax(*args, **kwargs):
    return fsl.segloss_stats(*args, activation="softmax", **kwargs)


def softmax_reference(*args, **kwargs):
    return softmax(*args, implementation="reference", **kwargs)


CASES = {
    "softmax/id-equal-to-C": Case(lambda: softmax(X, IDS_3), IAE, ID_RANGE + ("from 3 to 3",)),
    "softmax/negative-id-not-ignored": Case(
        lambda: softmax(X, IDS_NEG, ignore_index=255), IAE,
        ID_RANGE + ("or equal ignore_index = 255", "from -1 to -1")),
    "softmax/uint8-id-above-C": Case(
        lambda: softmax(X, np.where(IDS_3 == 3, 9, IDS_3).astype(np.uint8)), IAE,
        ID_RANGE + ("from 9 to 9",)),
    "softmax-reference/id-equal-to-C": Case(lambda: softmax_reference(X, IDS_3), IAE,
                                            ID_RANGE + ("from 3 to 3",)),
    "softmax-reference/negative-id-not-ignored": Case(
        lambda: softmax_reference(X, IDS_NEG, ignore_index=255), IAE,
        ID_RANGE + ("or equal ignore_index = 255", "from -1 to -1")),
    "softmax-reference/dynamic-sparse-shape": Case(
        lambda: dynamic(lambda x, y: softmax_reference(x, y), X, IDS[:, :2]), IAE,
        ("`labels`", "without the class axis")),
    "softmax/dynamic-sparse-shape": Case(lambda: dynamic(softmax, X, IDS[:, :2]), IAE,
                                         ("`labels`", "without the class axis")),
    "softmax/ignore-index-with-dense-labels": Case(
        lambda: softmax(X, Z, ignore_index=0), ValueError,
        ("`ignore_index`", "sparse integer `labels`")),
    "softmax/ignore-index-not-int": Case(lambda: softmax(X, IDS, ignore_index=1.5), ValueError,
                                         ("`ignore_index`", "an int")),
    "softmax/ignore-index-bool": Case(lambda: softmax(X, IDS, ignore_index=True), ValueError,
                                      ("`ignore_index`", "an int")),
    "softmax/sparse-shape-matches-no-rule": Case(
        lambda: softmax(X, IDS[:, :, :3]), ValueError, ("`labels`", "match no accepted form")),
    "softmax/labels-rank-too-low": Case(lambda: softmax(X, IDS[0]), ValueError,
                                        ("`labels`", "match no accepted form")),
    "softmax/sparse-float-ids": Case(lambda: softmax(X, IDS.astype(np.float32)), ValueError,
                                     ("sparse `labels`", "uint8, int32 or int64", "float32")),
    "softmax/sparse-bool-ids": Case(lambda: softmax(X, IDS.astype(bool)), ValueError,
                                    ("sparse `labels`", "uint8, int32 or int64", "bool")),
    "softmax/float-ids-with-class-axis": Case(
        lambda: softmax(X, IDS[..., None].astype(np.float32)), ValueError,
        ("`labels`", "class ids must be uint8, int32 or int64", "float32")),
    "softmax/pos-weight": Case(lambda: softmax(X, IDS, None, np.ones(3, np.float32)),
                               ValueError, ("`pos_weight`", "activation='softmax'",
                                            "class_weights")),
    "softmax/focal-alpha": Case(lambda: softmax(X, IDS, focal_alpha=0.25), ValueError,
                                ("`focal_alpha`", "activation='softmax'", "class_weights")),
    "stats/activation-unknown": Case(lambda: stats(X, Z, activation="relu"), ValueError,
                                     ("`activation`", "'sigmoid', 'softmax'", "'relu'")),
    "stats/ignore-index-with-sigmoid": Case(lambda: stats(X, Z, ignore_index=255), ValueError,
                                            ("`ignore_index`", "activation='softmax'")),
    "seg_loss/include-background-with-sigmoid": Case(
        lambda: fsl.seg_loss(X, Z, include_background=False), ValueError,
        ("`include_background`", "`activation`='softmax'")),
    "seg_loss/include-background-not-bool": Case(
        lambda: fsl.seg_loss(X, IDS, activation="softmax", include_background=0), ValueError,
        ("`include_background`", "bool")),
    "combine/include-background-with-sigmoid": Case(
        lambda: fsl.combine(np.ones((2, 3, 8), np.float32), include_background=False),
        ValueError, ("`include_background`", "`activation`='softmax'")),
    "combine/activation-unknown": Case(
        lambda: fsl.combine(np.ones((2, 3, 8), np.float32), activation="softplus"), ValueError,
        ("`activation`", "'sigmoid', 'softmax'")),
    "xla/softmax-id-equal-to-C": Case(lambda: xla(softmax, X, IDS_3), IAE,
                                      ID_RANGE + ("from 3 to 3",)),
    "keras/softmax-id-equal-to-C": Case(lambda: keras_loss(IDS_3, X, activation="softmax"),
                                        IAE, ID_RANGE),
    "keras/softmax-float-id-equal-to-C": Case(
        lambda: keras_loss(IDS_3.astype(np.float32), X, activation="softmax"), IAE, ID_RANGE),

}


@pytest.mark.parametrize("case_id", sorted(CASES))
def test_softmax_bad_input_raises_a_clear_error(case_id):
    assert_clear_error(CASES[case_id])
