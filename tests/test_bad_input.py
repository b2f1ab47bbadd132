"""Bad-input battery: every entry point, every kind of bad input.

Each case calls one entry point with one bad input and asserts the error type (ValueError
for what is known while tracing, tf.errors.InvalidArgumentError for data-dependent or
run-time problems) and that the message names the argument and what was expected. All
cases run in this process, the riskiest included (the raw ops with inconsistent canonical
weight shapes and a wrongly shaped grad_stats): a crash fails the whole run.

Entry points: the raw TF ops (fused_segloss.ops.library()), segloss_stats on the fused and
reference paths, seg_loss, combine, the pybind11 module _core, tf.function(jit_compile=True)
(the XLA path, or the reference inside XLA while that path is not available), and
fused_segloss.keras.SegLoss. Softmax mode's labels and options: test_bad_input_softmax.py;
the valid edge cases next to these (zero-size or non-contiguous inputs): test_edge_inputs.py.
"""
import numpy as np
import pytest
import tensorflow as tf

import fused_segloss as fsl
from fused_segloss import _core

from bad_input_helpers import (IAE, LABELS_RANGE, POS_WEIGHT_RANGE, STATIC_OR_DATA,
                               WEIGHTS_RANGE, Case, X, Z, assert_clear_error, dynamic,
                               keras_loss, raw, reference, stats, xla, xla_dynamic)

X_CF = np.ascontiguousarray(np.moveaxis(X, -1, 1))                 # [B, C, H, W]
Z_CF = np.ascontiguousarray(np.moveaxis(Z, -1, 1))
W_PIXEL = np.ones((2, 4, 4, 1), np.float32)
EMPTY = np.zeros([0], np.float32)     # the raw ops' "absent" weights
NO_PW = np.zeros([], np.float32)      # the raw ops' "absent" pos_weight (rank 0)
CANON_W = np.ones((2, 16, 3), np.float32)  # the raw ops' canonical weights [B, N, C]
GRAD = np.ones((2, 3, 8), np.float32)

CASES = {
    # ---------------------------------------------------------- segloss_stats (auto path)
    "stats/logits-rank-1": Case(lambda: stats(X[0, 0, 0], Z[0, 0, 0]), ValueError,
                                ("`logits`", "rank from 2 to 5")),
    "stats/logits-rank-6": Case(lambda: stats(X[None, None], Z[None, None]), ValueError,
                                ("`logits`", "rank from 2 to 5")),
    "stats/labels-shape": Case(lambda: stats(X, Z[:, :2]), ValueError,
                               ("`labels`", "must equal the `logits` shape")),
    "stats/labels-classes-channels-first": Case(
        lambda: stats(X_CF, Z_CF[:, :2], data_format="channels_first"), ValueError,
        ("`labels`", "must equal the `logits` shape")),
    "stats/weights-class-axis": Case(lambda: stats(X, Z, np.ones((2, 4, 4, 2), np.float32)),
                                     ValueError, ("`weights`", "does not broadcast")),
    "stats/weights-batch": Case(lambda: stats(X, Z, np.ones((3, 4, 4, 1), np.float32)),
                                ValueError, ("`weights`", "does not broadcast")),
    "stats/weights-channels-last-map-on-channels-first": Case(
        lambda: stats(X_CF, Z_CF, W_PIXEL, data_format="channels_first"), ValueError,
        ("`weights`", "does not broadcast")),
    "stats/weights-rank-too-high": Case(
        lambda: stats(X, Z, np.ones((1, 2, 4, 4, 3), np.float32)), ValueError,
        ("`weights`", "rank <= the logits' rank")),
    "stats/weights-string": Case(lambda: stats(X, Z, tf.constant(["a"])), ValueError,
                                 ("`weights`", "real number")),
    "stats/weights-negative": Case(lambda: stats(X, Z, -W_PIXEL), IAE, WEIGHTS_RANGE),
    "stats/weights-nan": Case(lambda: stats(X, Z, W_PIXEL * np.nan), IAE, WEIGHTS_RANGE),
    "stats/weights-inf": Case(lambda: stats(X, Z, W_PIXEL * np.inf), IAE, WEIGHTS_RANGE),
    "stats/pos-weight-length": Case(lambda: stats(X, Z, None, np.ones(2, np.float32)),
                                    ValueError, ("`pos_weight`", "[C] = [3]")),
    "stats/pos-weight-scalar": Case(lambda: stats(X, Z, None, 2.0), ValueError,
                                    ("`pos_weight`", "[C] = [3]")),
    "stats/pos-weight-negative": Case(
        lambda: stats(X, Z, None, np.array([1.0, -1.0, 1.0], np.float32)), STATIC_OR_DATA,
        POS_WEIGHT_RANGE),
    "stats/pos-weight-nan": Case(
        lambda: stats(X, Z, None, np.array([1.0, np.nan, 1.0], np.float32)), STATIC_OR_DATA,
        POS_WEIGHT_RANGE),
    "stats/labels-above-1": Case(lambda: stats(X, Z * 1.5), IAE, LABELS_RANGE),
    "stats/labels-below-0": Case(lambda: stats(X, Z - 0.25), IAE, LABELS_RANGE),
    "stats/labels-nan": Case(lambda: stats(X, Z + np.nan), IAE, LABELS_RANGE),
    "stats/labels-uint8-2": Case(lambda: stats(X, (2 * Z).astype(np.uint8)), IAE,
                                 ("`labels`", "uint8 labels must be 0 or 1")),
    "stats/logits-int32": Case(lambda: stats(X.astype(np.int32), Z), ValueError,
                               ("`logits`", "float16, bfloat16, float32, float64", "int32")),
    "stats/logits-complex": Case(lambda: stats(X.astype(np.complex64), Z), ValueError,
                                 ("`logits`", "float16, bfloat16, float32, float64")),
    "stats/labels-int8": Case(lambda: stats(X, Z.astype(np.int8)), ValueError,
                              ("`labels`", "uint8, bool, int32, int64", "int8")),
    # int32/int64 0/1 masks are cast to float32 exactly: a 2 is still out of range.
    "stats/labels-int32-2": Case(lambda: stats(X, (2 * Z).astype(np.int32)), IAE, LABELS_RANGE),
    "reference/labels-int64-2": Case(lambda: reference(X, (2 * Z).astype(np.int64)), IAE,
                                     LABELS_RANGE),
    "stats/labels-complex": Case(lambda: stats(X, Z.astype(np.complex64)), ValueError,
                                 ("`labels`", "uint8, bool")),
    "stats/data-format": Case(lambda: stats(X, Z, data_format="NHWC"), ValueError,
                              ("`data_format`", "'channels_last', 'channels_first'", "'NHWC'")),
    "stats/implementation": Case(lambda: stats(X, Z, implementation="cuda"), ValueError,
                                 ("`implementation`", "'auto', 'fused', 'reference'")),
    "stats/squared-not-bool": Case(lambda: stats(X, Z, squared="yes"), ValueError,
                                   ("`squared`", "bool")),
    "stats/check-numerics-not-bool": Case(lambda: stats(X, Z, check_numerics=1), ValueError,
                                          ("`check_numerics`", "bool")),
    "stats/zero-classes": Case(lambda: stats(X[..., :0], Z[..., :0]), ValueError,
                               ("`logits`", "C >= 1")),
    "stats/zero-classes-channels-first": Case(
        lambda: stats(X_CF[:, :0], Z_CF[:, :0], data_format="channels_first"), ValueError,
        ("`logits`", "C >= 1")),
    # Shapes only known at run time: the kernel's checks must still name the argument.
    "stats/dynamic-labels-shape": Case(lambda: dynamic(stats, X, Z[:, :2]), IAE,
                                       ("`labels`", "must equal the `logits` shape")),
    "stats/dynamic-weights-batch": Case(
        lambda: dynamic(stats, X, Z, np.ones((3, 4, 4, 1), np.float32)), IAE,
        ("`weights`", "does not broadcast")),
    "stats/dynamic-pos-weight-length": Case(
        lambda: dynamic(stats, X, Z, W_PIXEL, np.ones(2, np.float32)), IAE,
        ("`pos_weight`", "[C] = [3]")),
    # An empty pos_weight is how the raw op spells "absent": a user's empty vector must
    # not silently turn into "all ones".
    "stats/dynamic-pos-weight-empty": Case(
        lambda: dynamic(stats, X, Z, W_PIXEL, np.ones(0, np.float32)), IAE,
        ("`pos_weight`", "[C] = [3]")),
    "stats/dynamic-weights-empty-spatial": Case(
        lambda: dynamic(stats, X, Z, np.ones((2, 0, 0, 1), np.float32)), IAE,
        ("`weights`", "does not broadcast")),
    "stats/dynamic-zero-classes": Case(lambda: dynamic(stats, X[..., :0], Z[..., :0]), IAE,
                                       ("`logits`", "C >= 1")),

    # ---------------------------------------------------------- reference path
    "reference/labels-above-1": Case(lambda: reference(X, Z * 2.0), IAE, LABELS_RANGE),
    "reference/labels-uint8-2": Case(lambda: reference(X, (2 * Z).astype(np.uint8)), IAE,
                                     ("`labels`", "uint8 labels must be 0 or 1")),
    "reference/weights-negative": Case(lambda: reference(X, Z, -W_PIXEL), IAE, WEIGHTS_RANGE),
    "reference/weights-nan": Case(lambda: reference(X, Z, W_PIXEL * np.nan), IAE,
                                  WEIGHTS_RANGE),
    "reference/pos-weight-negative": Case(
        lambda: reference(X, Z, None, np.array([1.0, -1.0, 1.0], np.float32)), STATIC_OR_DATA,
        POS_WEIGHT_RANGE),
    "reference/dynamic-labels-shape": Case(lambda: dynamic(reference, X, Z[:, :2]), IAE,
                                           ("`labels`", "must equal the `logits` shape")),
    "reference/dynamic-zero-classes": Case(
        lambda: dynamic(lambda x, z: fsl.seg_loss(x, z, implementation="reference"),
                        X[..., :0], Z[..., :0]), IAE, ("`logits`", "C >= 1")),

    # ---------------------------------------------------------- seg_loss / combine options
    "seg_loss/unknown-option": Case(lambda: fsl.seg_loss(X, Z, dice="batch"), ValueError,
                                    ("unknown option", "'dice'", "valid options")),
    "seg_loss/dice-mode": Case(lambda: fsl.seg_loss(X, Z, dice_mode="image"), ValueError,
                               ("`dice_mode`", "'batch', 'per_image'")),
    "seg_loss/empty": Case(lambda: fsl.seg_loss(X, Z, empty="skip"), ValueError,
                           ("`empty`", "'include', 'exclude'")),
    "seg_loss/smooth-negative": Case(lambda: fsl.seg_loss(X, Z, smooth=-1e-5), ValueError,
                                     ("`smooth`", "finite number >= 0")),
    "seg_loss/smooth-nan": Case(lambda: fsl.seg_loss(X, Z, smooth=float("nan")), ValueError,
                                ("`smooth`", "finite number >= 0")),
    "seg_loss/dice-weight-inf": Case(lambda: fsl.seg_loss(X, Z, dice_weight=float("inf")),
                                     ValueError, ("`dice_weight`", "finite number >= 0")),
    "seg_loss/ce-weight-string": Case(lambda: fsl.seg_loss(X, Z, ce_weight="1"), ValueError,
                                      ("`ce_weight`", "number")),
    "seg_loss/class-weights-length": Case(
        lambda: fsl.seg_loss(X, Z, class_weights=[1.0, 2.0]), ValueError,
        ("`class_weights`", "[C] = [3]")),
    "seg_loss/class-weights-negative": Case(
        lambda: fsl.seg_loss(X, Z, class_weights=[1.0, -2.0, 1.0]), ValueError,
        ("`class_weights`", ">= 0")),
    "seg_loss/class-weights-zero-sum": Case(
        lambda: fsl.seg_loss(X, Z, class_weights=[0.0, 0.0, 0.0]), ValueError,
        ("`class_weights`", "positive sum")),
    "seg_loss/class-weights-nan": Case(
        lambda: fsl.seg_loss(X, Z, class_weights=[1.0, np.nan, 1.0]), ValueError,
        ("`class_weights`", ">= 0")),
    "combine/stats-columns": Case(lambda: fsl.combine(np.ones((2, 3, 7), np.float32)),
                                  ValueError, ("`stats`", "[B, C, 8]")),
    "combine/stats-rank": Case(lambda: fsl.combine(np.ones((3, 8), np.float32)), ValueError,
                               ("`stats`", "[B, C, 8]")),
    "combine/dynamic-class-weights-negative": Case(
        lambda: dynamic(lambda s, cw: fsl.combine(s, class_weights=cw).total,
                        np.ones((2, 3, 8), np.float32), np.array([1.0, -1.0, 1.0], np.float32)),
        IAE, ("`class_weights`", ">= 0")),

    # ---------------------------------------------------------- raw TF ops, called directly
    "raw/weights-canonical-spatial": Case(
        lambda: raw().fused_segloss_stats(X, Z, np.ones((2, 999, 3), np.float32), NO_PW), IAE,
        ("`weights`", "spatial size 999", "does not broadcast")),
    "raw/weights-canonical-batch": Case(
        lambda: raw().fused_segloss_stats(X, Z, np.ones((5, 16, 3), np.float32), NO_PW), IAE,
        ("`weights`", "batch size 5", "does not broadcast")),
    "raw/weights-canonical-classes-channels-first": Case(
        lambda: raw().fused_segloss_stats(X_CF, Z_CF, np.ones((2, 2, 16), np.float32), NO_PW,
                                          data_format="channels_first"), IAE,
        ("`weights`", "class size 2", "does not broadcast")),
    # A rank-3 weights view with a zero-size axis is not the "absent" sentinel (a rank-1
    # empty vector): it must be rejected, not read as "no weights".
    "raw/weights-canonical-empty-batch": Case(
        lambda: raw().fused_segloss_stats(X, Z, np.ones((0, 16, 3), np.float32), NO_PW), IAE,
        ("`weights`", "batch size 0", "does not broadcast")),
    # The same through tensors TF allocates itself (an empty TF buffer has no data pointer).
    "raw/weights-canonical-empty-batch-tf-buffer": Case(
        lambda: raw().fused_segloss_stats(X, Z, tf.zeros([0, 16, 3]), NO_PW), IAE,
        ("`weights`", "batch size 0", "does not broadcast")),
    "raw/weights-canonical-empty-spatial-tf-buffer": Case(
        lambda: raw().fused_segloss_stats(X, Z, tf.zeros([2, 0, 3]), NO_PW), IAE,
        ("`weights`", "spatial size 0", "does not broadcast")),
    "raw-grad/weights-canonical-empty-batch-tf-buffer": Case(
        lambda: raw().fused_segloss_stats_grad(X, Z, tf.zeros([0, 16, 3]), NO_PW, GRAD), IAE,
        ("`weights`", "batch size 0", "does not broadcast")),
    "raw/weights-rank-2": Case(
        lambda: raw().fused_segloss_stats(X, Z, np.ones((2, 3), np.float32), NO_PW), IAE,
        ("`weights`", "rank-3 canonical view")),
    "raw/pos-weight-length": Case(
        lambda: raw().fused_segloss_stats(X, Z, EMPTY, np.ones(2, np.float32)), IAE,
        ("`pos_weight`", "[C] = [3]")),
    "raw/pos-weight-rank-2": Case(
        lambda: raw().fused_segloss_stats(X, Z, EMPTY, np.ones((1, 3), np.float32)), IAE,
        ("`pos_weight`", "[C] = [3]")),
    "raw/pos-weight-negative": Case(
        lambda: raw().fused_segloss_stats(X, Z, EMPTY, np.array([1, -1, 1], np.float32)), IAE,
        POS_WEIGHT_RANGE),
    "raw/labels-shape": Case(lambda: raw().fused_segloss_stats(X, Z[:, :2], EMPTY, NO_PW), IAE,
                             ("`labels`", "must equal the `logits` shape")),
    "raw/logits-rank-1": Case(
        lambda: raw().fused_segloss_stats(X[0, 0, 0], Z[0, 0, 0], EMPTY, NO_PW), IAE,
        ("`logits`", "rank 2 to 5")),
    "raw/logits-rank-6": Case(
        lambda: raw().fused_segloss_stats(X[None, None], Z[None, None], EMPTY, NO_PW), IAE,
        ("`logits`", "rank 2 to 5")),
    "raw/logits-int32": Case(
        lambda: raw().fused_segloss_stats(X.astype(np.int32), Z, EMPTY, NO_PW), IAE,
        ("attr 'T'", "int32", "half, bfloat16, float, double")),
    "raw/data-format-attr": Case(
        lambda: raw().fused_segloss_stats(X, Z, EMPTY, NO_PW, data_format="NHWC"), IAE,
        ("data_format", "channels_last")),
    "raw/labels-above-1": Case(lambda: raw().fused_segloss_stats(X, 2 * Z, EMPTY, NO_PW), IAE,
                               LABELS_RANGE),
    "raw/weights-negative": Case(lambda: raw().fused_segloss_stats(X, Z, -CANON_W, NO_PW), IAE,
                                 WEIGHTS_RANGE),
    "raw/zero-classes": Case(
        lambda: raw().fused_segloss_stats(X[..., :0], Z[..., :0], EMPTY, NO_PW), IAE,
        ("`logits`", "C >= 1")),
    "raw-grad/grad-stats-columns": Case(
        lambda: raw().fused_segloss_stats_grad(X, Z, EMPTY, NO_PW, GRAD[..., :7]), IAE,
        ("`grad_stats`", "[2, 3, 8]")),
    "raw-grad/grad-stats-flat": Case(
        lambda: raw().fused_segloss_stats_grad(X, Z, EMPTY, NO_PW, GRAD.ravel()), IAE,
        ("`grad_stats`", "[2, 3, 8]")),
    "raw-grad/grad-stats-batch": Case(
        lambda: raw().fused_segloss_stats_grad(X, Z, EMPTY, NO_PW, np.ones((3, 3, 8),
                                                                           np.float32)), IAE,
        ("`grad_stats`", "[2, 3, 8]")),
    "raw-grad/grad-stats-empty": Case(
        lambda: raw().fused_segloss_stats_grad(X, Z, EMPTY, NO_PW, GRAD[:0]), IAE,
        ("`grad_stats`", "[2, 3, 8]")),
    "raw-grad/weights-canonical-spatial": Case(
        lambda: raw().fused_segloss_stats_grad(X, Z, np.ones((2, 999, 3), np.float32), NO_PW,
                                               GRAD), IAE,
        ("`weights`", "spatial size 999", "does not broadcast")),
    "raw-grad/labels-shape": Case(
        lambda: raw().fused_segloss_stats_grad(X, Z[:1], EMPTY, NO_PW, GRAD), IAE,
        ("`labels`", "must equal the `logits` shape")),
    "raw-grad/pos-weight-length": Case(
        lambda: raw().fused_segloss_stats_grad(X, Z, EMPTY, np.ones(4, np.float32), GRAD), IAE,
        ("`pos_weight`", "[C] = [3]")),

    # ---------------------------------------------------------- pybind11 module _core
    "core/logits-int32": Case(lambda: _core.stats(X.astype(np.int32), Z), ValueError,
                              ("`logits`", "int32", "float32")),
    "core/logits-complex": Case(lambda: _core.stats(X.astype(np.complex64), Z), ValueError,
                                ("`logits`", "complex64", "float32")),
    "core/logits-uint8": Case(lambda: _core.stats(X.astype(np.uint8), Z), ValueError,
                              ("`logits`", "float")),
    # The core reads int64 only as class ids (softmax, shape without the class axis).
    "core/labels-int64": Case(lambda: _core.stats(X, Z.astype(np.int64)), ValueError,
                              ("`labels`", "int64", "class ids")),
    "core/logits-rank-1": Case(lambda: _core.stats(X[0, 0, 0], Z[0, 0, 0]), ValueError,
                               ("`logits`", "rank 2 to 5")),
    "core/labels-shape": Case(lambda: _core.stats(X, Z[:1]), ValueError,
                              ("`labels`", "must equal the `logits` shape")),
    "core/labels-rank": Case(lambda: _core.stats(X, Z[0]), ValueError,
                             ("`labels`", "must equal the `logits` shape")),
    "core/weights-rank": Case(lambda: _core.stats(X, Z, np.ones((2, 16), np.float32)),
                              ValueError, ("`weights`", "rank-3")),
    "core/weights-canonical": Case(lambda: _core.stats(X, Z, np.ones((2, 15, 3), np.float32)),
                                   ValueError, ("`weights`", "spatial size 15",
                                                "does not broadcast")),
    "core/weights-empty": Case(lambda: _core.stats(X, Z, np.ones((0, 16, 3), np.float32)),
                               ValueError, ("`weights`", "does not broadcast")),
    "core/weights-negative": Case(lambda: _core.stats(X, Z, -CANON_W), ValueError,
                                  WEIGHTS_RANGE),
    "core/pos-weight-length": Case(lambda: _core.stats(X, Z, None, np.ones(2, np.float32)),
                                   ValueError, ("`pos_weight`", "[C]")),
    "core/pos-weight-negative": Case(
        lambda: _core.stats(X, Z, None, np.array([1, -1, 1], np.float32)), ValueError,
        POS_WEIGHT_RANGE),
    "core/labels-above-1": Case(lambda: _core.stats(X, 2 * Z), ValueError, LABELS_RANGE),
    "core/grad-stats-shape": Case(lambda: _core.logit_grad(X, Z, grad_stats=GRAD[:, :2]),
                                  ValueError, ("`grad_stats`", "[B, C, 8]")),
    "core/grad-stats-missing": Case(lambda: _core.logit_grad(X, Z, grad_stats=None),
                                    ValueError, ("`grad_stats`", "[B, C, 8]")),
    "core/zero-classes": Case(lambda: _core.stats(X[..., :0], Z[..., :0]), ValueError,
                              ("`logits`", "C >= 1")),

    # ---------------------------------------------------------- inside XLA (jit_compile)
    "xla/labels-shape": Case(lambda: xla(stats, X, Z[:, :2]), ValueError,
                             ("`labels`", "must equal the `logits` shape")),
    "xla/logits-int32": Case(lambda: xla(stats, X.astype(np.int32), Z), ValueError,
                             ("`logits`", "float16, bfloat16, float32, float64")),
    "xla/weights-broadcast": Case(lambda: xla(stats, X, Z, np.ones((2, 4, 4, 2), np.float32)),
                                  ValueError, ("`weights`", "does not broadcast")),
    "xla/data-format": Case(lambda: xla(lambda x, z: stats(x, z, data_format="NCHW"), X, Z),
                            ValueError, ("`data_format`", "'channels_last'")),
    # Data-dependent checks must survive XLA compilation (tf.debugging.Assert does not).
    "xla/labels-above-1": Case(lambda: xla(stats, X, 2 * Z), IAE, LABELS_RANGE),
    "xla/weights-negative": Case(lambda: xla(stats, X, Z, -W_PIXEL), IAE, WEIGHTS_RANGE),
    "xla/labels-uint8-2": Case(lambda: xla(stats, X, (2 * Z).astype(np.uint8)), IAE,
                               ("`labels`", "uint8 labels must be 0 or 1")),
    "xla/pos-weight-negative": Case(
        lambda: xla(stats, X, Z, None, np.array([1.0, -1.0, 1.0], np.float32)), STATIC_OR_DATA,
        POS_WEIGHT_RANGE),
    # Traced with unknown shapes, compiled for the concrete ones: the checks run in XLA.
    "xla/dynamic-labels-shape": Case(lambda: xla_dynamic(stats, X, Z[:, :2]), IAE,
                                     ("`labels`", "must equal the `logits` shape")),
    "xla/dynamic-pos-weight-length": Case(
        lambda: xla_dynamic(stats, X, Z, W_PIXEL, np.ones(2, np.float32)), IAE,
        ("`pos_weight`", "[C] = [3]")),
    "xla/dynamic-pos-weight-empty": Case(
        lambda: xla_dynamic(stats, X, Z, W_PIXEL, np.ones(0, np.float32)), IAE,
        ("`pos_weight`", "[C] = [3]")),
    "xla/dynamic-weights-empty-spatial": Case(
        lambda: xla_dynamic(stats, X, Z, np.ones((2, 0, 0, 1), np.float32)), IAE,
        ("`weights`", "does not broadcast")),
    "xla/dynamic-weights-empty-batch": Case(
        lambda: xla_dynamic(stats, X, Z, np.ones((0, 4, 4, 1), np.float32)), IAE,
        ("`weights`", "does not broadcast")),
    "xla/dynamic-zero-classes": Case(lambda: xla_dynamic(stats, X[..., :0], Z[..., :0]), IAE,
                                     ("`logits`", "C >= 1")),

    # ---------------------------------------------------------- keras SegLoss
    "keras/dice-mode": Case(lambda: keras_loss(Z, X, dice_mode="image"), ValueError,
                            ("`dice_mode`", "'batch', 'per_image'")),
    "keras/data-format": Case(lambda: keras_loss(Z, X, data_format="NHWC"), ValueError,
                              ("`data_format`", "'channels_last'")),
    "keras/class-weights-length": Case(
        lambda: keras_loss(Z, X, class_weights=[1.0, 1.0]), ValueError,
        ("`class_weights`", "[C] = [3]")),
    "keras/labels-shape": Case(lambda: keras_loss(Z[:, :2], X), ValueError,
                               ("`labels`", "must equal the `logits` shape")),
    "keras/labels-above-1": Case(lambda: keras_loss(2 * Z, X), IAE, LABELS_RANGE),
    "keras/sample-weight-negative": Case(
        lambda: keras_loss(Z, X, sample_weight=-np.ones((2,), np.float32)), IAE,
        WEIGHTS_RANGE),
}

def test_battery_is_large_enough():
    assert len(CASES) >= 30


@pytest.mark.parametrize("case_id", sorted(CASES))
def test_bad_input_raises_a_clear_error(case_id):
    assert_clear_error(CASES[case_id])
