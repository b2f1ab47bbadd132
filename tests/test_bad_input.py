"""Bad-input battery: every entry point, every kind of bad input.

Each case calls one entry point with one bad input and asserts the error type (ValueError
for what is known while tracing, tf.errors.InvalidArgumentError for data-dependent or
run-time problems) and that the message names the argument and what was expected. All
cases run in this process, the riskiest included (the raw ops with inconsistent canonical
weight shapes and a wrongly shaped grad_stats): a crash fails the whole run.

Entry points: the raw TF ops (fused_segloss.ops.library()), segloss_stats on the fused and
reference paths, seg_loss, combine, the pybind11 module _core, tf.function(jit_compile=True)
(the XLA path, or the reference inside XLA while that path is not available), and
fused_segloss.keras.SegLoss. At the end: the valid edge cases next to them (zero-size
batch or spatial dims; strided, reversed, Fortran-ordered or byte-swapped inputs), which
must give finite results equal to the oracle's or to those of the contiguous copy.
"""
import json
import shutil
from typing import Callable, NamedTuple, Tuple

import numpy as np
import pytest
import tensorflow as tf

import fused_segloss as fsl
from fused_segloss import _core, _loader

import numpy_reference

IAE = tf.errors.InvalidArgumentError

_rng = np.random.default_rng(7)
X = _rng.normal(0.0, 2.0, (2, 4, 4, 3)).astype(np.float32)        # [B, H, W, C]
Z = (_rng.random((2, 4, 4, 3)) < 0.4).astype(np.float32)
X_CF = np.ascontiguousarray(np.moveaxis(X, -1, 1))                 # [B, C, H, W]
Z_CF = np.ascontiguousarray(np.moveaxis(Z, -1, 1))
W_PIXEL = np.ones((2, 4, 4, 1), np.float32)
EMPTY = np.zeros([0], np.float32)     # the raw ops' "absent" weights
NO_PW = np.zeros([], np.float32)      # the raw ops' "absent" pos_weight (rank 0)
CANON_W = np.ones((2, 16, 3), np.float32)  # the raw ops' canonical weights [B, N, C]
GRAD = np.ones((2, 3, 8), np.float32)


class Case(NamedTuple):
    call: Callable[[], object]
    error: type
    fragments: Tuple[str, ...]  # the argument's name and the expectation, verbatim


def raw():
    if not fsl.fused_available():
        pytest.skip("the op library is not built")
    return fsl.ops.library()


def stats(*args, **kwargs):
    return fsl.segloss_stats(*args, **kwargs)


def reference(*args, **kwargs):
    return fsl.segloss_stats(*args, implementation="reference", **kwargs)


def xla(fn, *args):
    """fn(*args) inside tf.function(jit_compile=True)."""
    return tf.function(fn, jit_compile=True)(*args)


def dynamic(fn, *args, jit_compile=False):
    """fn(*args) traced with every dimension unknown (shapes only known at run time)."""
    specs = [tf.TensorSpec([None] * np.ndim(a), tf.as_dtype(np.asarray(a).dtype)) for a in args]
    return tf.function(fn, input_signature=specs, jit_compile=jit_compile)(*args)


def xla_dynamic(fn, *args):
    return dynamic(fn, *args, jit_compile=True)


def keras_loss(y_true, y_pred, sample_weight=None, **options):
    keras_module = pytest.importorskip("fused_segloss.keras",
                                       reason="fused_segloss.keras is not available")
    loss = keras_module.SegLoss(**options)
    return loss(y_true, y_pred, sample_weight=sample_weight)


LABELS_RANGE = ("`labels`", "must lie in [0, 1]")
IDS = _rng.integers(0, 3, (2, 4, 4)).astype(np.int32)             # class ids [B, H, W]
IDS_3 = np.where(IDS == 1, 3, IDS).astype(np.int32)                # some ids = C
IDS_NEG = np.where(IDS == 1, -1, IDS).astype(np.int64)             # some ids = -1
ID_RANGE = ("`labels`", "class ids must lie in [0, C) = [0, 3)")


def softmax(*args, **kwargs):
    return fsl.segloss_stats(*args, activation="softmax", **kwargs)


def softmax_reference(*args, **kwargs):
    return softmax(*args, implementation="reference", **kwargs)
WEIGHTS_RANGE = ("`weights`", "must be finite and >= 0")
POS_WEIGHT_RANGE = ("`pos_weight`", ">= 0")
STATIC_OR_DATA = (ValueError, IAE)  # a constant may be checked while tracing or at run time

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

    # ---------------------------------------------------------- softmax mode
    "softmax/id-equal-to-C": Case(lambda: softmax(X, IDS_3), IAE, ID_RANGE + ("from 3 to 3",)),
    "softmax/negative-id-not-ignored": Case(
        lambda: softmax(X, IDS_NEG, ignore_index=255), IAE,
        ID_RANGE + ("or equal ignore_index = 255", "from -1 to -1")),
    "softmax/uint8-id-above-C": Case(lambda: softmax(X, np.where(IDS_3 == 3, 9, IDS_3).astype(np.uint8)), IAE,
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
    case = CASES[case_id]
    with pytest.raises(case.error) as info:
        result = case.call()
        # Errors raised lazily must surface when the value is read.
        tf.nest.map_structure(lambda t: np.asarray(t), result)
    message = str(info.value)
    missing = [fragment for fragment in case.fragments if fragment not in message]
    assert not missing, f"message lacks {missing}: {message[:1500]}"


# ================================================================================ valid edges
PATHS = ("fused", "reference", "xla")


def loss_stats_and_grad(path, x, z, w=None, pw=None, data_format="channels_last", **options):
    """(stats, total, d total / d logits) as NumPy arrays on one code path."""
    implementation = "reference" if path == "reference" else "auto"
    if path == "fused" and not fsl.fused_available():
        pytest.skip("the op library is not built")

    def run(x, z, w, pw):
        with tf.GradientTape() as tape:
            tape.watch(x)
            stats = fsl.segloss_stats(x, z, w, pw, data_format=data_format,
                                      implementation=implementation)
            total = fsl.combine(stats, **options).total
        return stats, total, tape.gradient(total, x)

    if path == "xla":
        run = tf.function(run, jit_compile=True)
    as_tensor = lambda a: None if a is None else tf.convert_to_tensor(a)  # noqa: E731
    return tuple(np.asarray(t) for t in run(as_tensor(x), as_tensor(z), as_tensor(w),
                                            as_tensor(pw)))


ZERO_SIZE_SHAPES = {  # (logits shape, weights shape), channels_last
    "batch-0": ((0, 5, 3), (0, 5, 1)),
    "batch-0-rank-0-spatial": ((0, 4), (0, 4)),
    "spatial-0": ((2, 0, 3), (2, 0, 3)),
    "one-of-three-spatial-0": ((2, 3, 0, 4, 2), (1, 3, 0, 4, 1)),
}
COMBINE_MODES = [dict(dice_mode=m, empty=e, smooth=s) for m in ("batch", "per_image")
                 for e in ("include", "exclude") for s in (1e-5, 0.0)]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shape_id", sorted(ZERO_SIZE_SHAPES))
@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
def test_zero_size_batch_or_spatial_dims_give_finite_results(path, shape_id, data_format):
    shape, w_shape = ZERO_SIZE_SHAPES[shape_id]
    if data_format == "channels_first":
        shape, w_shape = (shape[0], shape[-1], *shape[1:-1]), (w_shape[0], w_shape[-1],
                                                              *w_shape[1:-1])
    x = np.zeros(shape, np.float32)
    z = np.zeros(shape, np.float32)
    w = np.ones(w_shape, np.float32)
    classes = shape[-1] if data_format == "channels_last" else shape[1]
    pw = np.full(classes, 2.0, np.float32)
    expected_stats = numpy_reference.stats(x, z, w, pw, data_format)
    # combine is the same pure TF on every path: inside XLA (a compile per option set) two
    # opposite option sets suffice.
    modes = COMBINE_MODES if path != "xla" else [COMBINE_MODES[1], COMBINE_MODES[-1]]
    for options in modes:
        stats, total, grad = loss_stats_and_grad(path, x, z, w, pw, data_format, **options)
        assert stats.shape == (shape[0], classes, 8)
        np.testing.assert_array_equal(stats, expected_stats)
        expected_total = numpy_reference.combine(expected_stats, **options).total
        assert np.isfinite(total) and total == expected_total, (options, total)
        assert grad.shape == x.shape and np.isfinite(grad).all()


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
def test_zero_size_dims_in_core_module(data_format):
    channels_last = data_format == "channels_last"
    for shape in ((0, 6, 3), (2, 0, 3), (2, 4, 0, 3)):
        if not channels_last:
            shape = (shape[0], shape[-1], *shape[1:-1])
        x = np.zeros(shape, np.float32)
        z = np.ones(shape, np.uint8)
        classes = shape[-1] if channels_last else shape[1]
        stats = _core.stats(x, z, channels_last=channels_last, threads=3)
        np.testing.assert_array_equal(stats, numpy_reference.stats(x, z, data_format=data_format))
        grad = _core.logit_grad(x, z, grad_stats=np.ones((shape[0], classes, 8), np.float32),
                                channels_last=channels_last, threads=3)
        assert grad.shape == x.shape and grad.dtype == x.dtype


def _views(x):
    """Non-contiguous (or otherwise unusual) views of x with the same shape [B, H, W, C]."""
    big = np.zeros((x.shape[0], 2 * x.shape[1], x.shape[2] + 1, x.shape[3] + 2), x.dtype)
    big[:, ::2, 1:, 2:] = x
    reversed_buffer = np.ascontiguousarray(x[:, ::-1])
    return {
        "strided-slice": big[:, ::2, 1:, 2:],
        "negative-stride": reversed_buffer[:, ::-1],
        "fortran-order": np.asfortranarray(x),
        "big-endian": x.astype(x.dtype.newbyteorder(">")),
        "transposed-back": np.ascontiguousarray(np.moveaxis(x, -1, 1)).transpose(0, 2, 3, 1),
    }


VIEW_KINDS = sorted(_views(np.zeros((1, 1, 1, 1), np.float32)))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("view", VIEW_KINDS)
def test_non_contiguous_inputs_equal_the_contiguous_copy(path, view):
    rng = np.random.default_rng(11)
    x = rng.normal(0.0, 3.0, (2, 6, 5, 3)).astype(np.float32)
    z = rng.random((2, 6, 5, 3)).astype(np.float32)
    w = rng.uniform(0.0, 2.0, (2, 6, 5, 1)).astype(np.float32)
    pw = np.array([0.5, 1.0, 3.0], np.float32)
    expected = loss_stats_and_grad(path, x, z, w, pw)
    got = loss_stats_and_grad(path, _views(x)[view], _views(z)[view], _views(w)[view], pw)
    for name, a, b in zip(("stats", "total", "gradient"), got, expected):
        np.testing.assert_array_equal(a, b, err_msg=f"{name} of a {view} view")


@pytest.mark.parametrize("view", VIEW_KINDS)
@pytest.mark.parametrize("logits_dtype", [np.float32, np.float64, np.float16])
def test_non_contiguous_inputs_in_core_module(view, logits_dtype):
    rng = np.random.default_rng(12)
    x = rng.normal(0.0, 3.0, (2, 6, 5, 3)).astype(logits_dtype)
    z = (rng.random((2, 6, 5, 3)) < 0.5).astype(np.float32)
    w = rng.uniform(0.0, 2.0, (2, 30, 3)).astype(np.float32)   # canonical [B, N, C]
    w_view = {"strided-slice": np.repeat(w, 2, axis=1)[:, ::2], "negative-stride":
              np.ascontiguousarray(w[:, ::-1])[:, ::-1], "fortran-order": np.asfortranarray(w),
              "big-endian": w.astype(">f4"), "transposed-back":
              np.ascontiguousarray(w.transpose(0, 2, 1)).transpose(0, 2, 1)}[view]
    g = rng.normal(0.0, 1.0, (2, 3, 8)).astype(np.float32)
    g_strided = np.repeat(g, 2, axis=2)[..., ::2]
    xv, zv = _views(x)[view], _views(z)[view]
    np.testing.assert_array_equal(_core.stats(xv, zv, w_view), _core.stats(x, z, w))
    np.testing.assert_array_equal(_core.logit_grad(xv, zv, w_view, grad_stats=g_strided),
                                  _core.logit_grad(x, z, w, grad_stats=g))


# ================================================================================ the library
def test_library_built_for_another_tf_version_is_explained(tmp_path, monkeypatch):
    """load_library() on a copy of the built library whose build record names another
    TensorFlow: refused with both versions named. (The fallback and implementation="fused"
    in this situation: test_fallback.py.)"""
    if _loader.status().path is None:
        pytest.skip("the op library is not built")
    shutil.copy(_loader.status().path, tmp_path / "_segloss_ops.so")
    (tmp_path / "_build_info.json").write_text(json.dumps({"tensorflow_version": "1.15.0"}))
    monkeypatch.setattr(_loader, "_HERE", str(tmp_path))
    status = _loader.load_library()
    assert not status.available
    assert "1.15.0" in status.reason and tf.__version__ in status.reason
    assert "rebuild" in status.reason


def test_corrupt_library_file_is_explained(tmp_path, monkeypatch):
    (tmp_path / "_segloss_ops.so").write_text("not an ELF file")
    monkeypatch.setattr(_loader, "_HERE", str(tmp_path))
    status = _loader.load_library()
    assert not status.available
    assert "_segloss_ops.so" in status.reason and "failed" in status.reason
