"""The CPU kernels' lane geometry (csrc/core/segloss_cpu_blocks.h, segloss_cpu_forward.cc,
segloss_cpu_grad.cc, simd.h).

The kernels process rows of `period` elements (a multiple of C, or C itself for large C,
or one class's positions for channels_first) as SIMD vectors of 4, 8, 16 or 32 lanes
depending on the machine, with a partial last vector when the period is not a multiple
of the width, and a short last row at the end of every block and item. Class counts
around every width and odd position counts hit each of these paths; every case is compared
with the float64 NumPy oracle, and the integer count columns must match exactly (an
element visited twice, or a padding lane counted, changes a count by at least 1).

Also: the gradient op may write into the logits' buffer (TF forwards an input it holds
the only reference to); the logits must still be intact wherever anyone else can see them.
"""
import numpy as np
import pytest
import tensorflow as tf

import fused_segloss as fsl
import numpy_reference as ref

core = pytest.importorskip("fused_segloss._core")

CLASSES = [1, 2, 3, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 47, 100, 129]
POSITIONS = [1, 3, 37, 1000, 7001]  # 7001: several work items for small C, ragged ends
COUNT_COLUMNS = [ref.WEIGHT_SUM, ref.HARD_TP, ref.HARD_PRED, ref.HARD_LABEL]


def make_case(rng, positions, classes, channels_last, weights):
    shape = (2, positions, classes) if channels_last else (2, classes, positions)
    x = rng.normal(0.0, 3.0, shape).astype(np.float32)
    z = (rng.random(shape) < 0.4).astype(np.float32)
    soft = rng.random(shape) < 0.2
    z[soft] = rng.random(int(soft.sum()))
    w = None
    if weights == "pixel":  # an integer weight map over positions, broadcast over classes
        dims = (2, positions, 1) if channels_last else (2, 1, positions)
        w = rng.integers(0, 3, dims).astype(np.float32)
    elif weights == "full":
        w = rng.integers(0, 3, shape).astype(np.float32)
    pw = rng.uniform(0.5, 3.0, classes).astype(np.float32)
    return x, z, w, pw


@pytest.mark.parametrize("channels_last", [True, False], ids=["last", "first"])
@pytest.mark.parametrize("classes", CLASSES)
def test_every_lane_geometry_matches_numpy(classes, channels_last, check):
    rng = np.random.default_rng(classes * 2 + channels_last)
    fmt = "channels_last" if channels_last else "channels_first"
    for positions in POSITIONS:
        for weights in (None, "pixel", "full"):
            squared = weights == "pixel"
            x, z, w, pw = make_case(rng, positions, classes, channels_last, weights)
            w_full = None if w is None else np.broadcast_to(w, x.shape)
            what = f"N={positions} weights={weights}"

            stats = core.stats(x, z, w, pw, channels_last=channels_last, squared=squared)
            expected = ref.stats(x, z, w_full, pw, fmt, squared)
            check.stats(stats, expected, "float32", what=f"stats {what}")
            # Integer weights: the count columns are exact integers in any summation order.
            np.testing.assert_array_equal(stats[..., COUNT_COLUMNS], expected[..., COUNT_COLUMNS],
                                          err_msg=what)

            grad_stats = rng.normal(0.0, 1.0, (2, classes, 8)).astype(np.float32)
            grad = core.logit_grad(x, z, w, pw, grad_stats, channels_last=channels_last,
                                   squared=squared)
            check.grad(grad, ref.logit_grad(x, z, w_full, pw, grad_stats, fmt, squared),
                       ref.logit_grad_scale(x, z, w_full, pw, grad_stats, fmt, squared),
                       "float32", what=f"gradient {what}")


@pytest.mark.parametrize("channels_last", [True, False], ids=["last", "first"])
@pytest.mark.parametrize("classes", [1, 3, 7, 16, 17, 33, 129])
def test_focal_variant_lane_geometry_matches_numpy(classes, channels_last, check):
    """The focal kernels are instantiations of their own: the same geometry checks."""
    rng = np.random.default_rng(classes * 2 + channels_last + 1000)
    fmt = "channels_last" if channels_last else "channels_first"
    for positions in (1, 37, 1000):
        for weights, pos_weight, alpha in ((None, False, None), ("full", True, 0.25)):
            x, z, w, pw = make_case(rng, positions, classes, channels_last, weights)
            pw = pw if pos_weight else None
            w_full = None if w is None else np.broadcast_to(w, x.shape)
            focal = dict(focal_gamma=0.5, focal_alpha=alpha)
            kernel_focal = dict(focal_gamma=0.5, focal_alpha=-1.0 if alpha is None else alpha)
            what = f"N={positions} weights={weights}"
            stats = core.stats(x, z, w, pw, channels_last=channels_last, **kernel_focal)
            expected = ref.stats(x, z, w_full, pw, fmt, **focal)
            check.stats(stats, expected, "float32", what=f"stats {what}")
            grad_stats = rng.normal(0.0, 1.0, (2, classes, 8)).astype(np.float32)
            grad = core.logit_grad(x, z, w, pw, grad_stats, channels_last=channels_last,
                                   **kernel_focal)
            check.grad(grad, ref.logit_grad(x, z, w_full, pw, grad_stats, fmt, **focal),
                       ref.logit_grad_scale(x, z, w_full, pw, grad_stats, fmt, **focal),
                       "float32", what=f"gradient {what}")


@pytest.mark.parametrize("classes", [3, 17])
def test_invalid_labels_counted_once_in_partial_vectors(classes):
    """A bad label in a padded vector position is reported with the exact count."""
    rng = np.random.default_rng(7)
    x, z, _, _ = make_case(rng, 37, classes, True, None)
    z[0, 36, classes - 1] = 1.5   # last element of the last (short) row
    z[1, 0, 0] = np.nan
    with pytest.raises(ValueError, match=r"found 2 value\(s\)"):
        core.stats(x, z, channels_last=True)


# Every broadcast of the canonical weight view [Bw, Nw, Cw] ([Bw, Cw, Nw] channels_first):
# each kernel path that resolves it (the map read in place, repeated across classes with
# vector permutes, one value filled, one weight per class).
BROADCASTS = {"full": (2, "n", "c"), "pixel": (2, "n", 1), "shared_map": (1, "n", 1),
              "image": (2, 1, 1), "class": (1, 1, "c"), "image_class": (2, 1, "c")}


def _canonical_weights(rng, kind, positions, classes, channels_last):
    b, n, c = (positions if d == "n" else classes if d == "c" else d
               for d in BROADCASTS[kind])
    dims = (b, n, c) if channels_last else (b, c, n)
    return rng.integers(0, 4, dims).astype(np.float32) * 0.5


@pytest.mark.parametrize("channels_last", [True, False], ids=["last", "first"])
@pytest.mark.parametrize("kind", sorted(BROADCASTS))
def test_broadcast_weights_equal_their_expansion_bit_for_bit(kind, channels_last):
    """However the kernel resolves a broadcast weight map, each element gets its own weight:
    stats and gradient equal those of the explicitly expanded map exactly, for class counts
    around the vector widths (repeat patterns of every phase, runs longer than a vector) and
    position counts with ragged block ends."""
    rng = np.random.default_rng(len(kind) * 2 + channels_last)
    for classes in [1, 2, 3, 5, 7, 15, 16, 17, 40]:
        for positions in [1, 3, 37, 7001]:
            x, z, _, pw = make_case(rng, positions, classes, channels_last, None)
            w = _canonical_weights(rng, kind, positions, classes, channels_last)
            w_full = np.ascontiguousarray(np.broadcast_to(w, x.shape))
            grad_stats = rng.normal(0.0, 1.0, (2, classes, 8)).astype(np.float32)
            what = f"{kind} C={classes} N={positions}"
            np.testing.assert_array_equal(
                core.stats(x, z, w, pw, channels_last=channels_last),
                core.stats(x, z, w_full, pw, channels_last=channels_last), err_msg=what)
            np.testing.assert_array_equal(
                core.logit_grad(x, z, w, pw, grad_stats, channels_last=channels_last),
                core.logit_grad(x, z, w_full, pw, grad_stats, channels_last=channels_last),
                err_msg=what)


@pytest.mark.parametrize("channels_last", [True, False], ids=["last", "first"])
@pytest.mark.parametrize("kind", ["pixel", "image", "class"])
def test_an_invalid_broadcast_weight_counts_once_per_element_it_covers(kind, channels_last):
    """The error counts elements with an invalid weight, as for the expanded map (and as the
    GPU kernel counts them)."""
    rng = np.random.default_rng(11)
    classes, positions = 5, 1001
    x, z, _, _ = make_case(rng, positions, classes, channels_last, None)
    w = _canonical_weights(rng, kind, positions, classes, channels_last)
    w.flat[0] = -1.0
    covered = x.size // w.size
    with pytest.raises(ValueError, match=rf"found {covered} negative, infinite or NaN"):
        core.stats(x, z, w, channels_last=channels_last)
    with pytest.raises(ValueError, match=rf"found {covered} negative, infinite or NaN"):
        core.stats(x, z, np.broadcast_to(w, x.shape).copy(), channels_last=channels_last)


def _intermediate_logits_step():
    @tf.function
    def step(features, labels):
        with tf.GradientTape() as tape:
            tape.watch(features)
            logits = features * 2.0 - 1.0  # an intermediate: TF may reuse its buffer
            loss = fsl.seg_loss(logits, labels, implementation="fused")
        return tape.gradient(loss, features)
    return step


def _reference_grad(features, labels):
    with tf.GradientTape() as tape:
        tape.watch(features)
        loss = fsl.seg_loss(features * 2.0 - 1.0, labels, implementation="reference")
    return tape.gradient(loss, features)


def test_gradient_correct_when_logits_buffer_can_be_reused():
    rng = np.random.default_rng(3)
    features = tf.constant(rng.normal(0.0, 2.0, (2, 64, 64, 3)).astype(np.float32))
    labels = tf.constant((rng.random((2, 64, 64, 3)) < 0.3).astype(np.float32))
    before = features.numpy().copy()
    got = _intermediate_logits_step()(features, labels)
    np.testing.assert_allclose(got.numpy(), _reference_grad(features, labels).numpy(),
                               rtol=1e-4, atol=1e-9)
    np.testing.assert_array_equal(features.numpy(), before)  # the inputs are untouched


def test_logits_still_used_after_the_gradient_are_not_overwritten():
    rng = np.random.default_rng(4)
    logits = tf.constant(rng.normal(0.0, 2.0, (2, 32, 32, 4)).astype(np.float32))
    labels = tf.constant((rng.random((2, 32, 32, 4)) < 0.3).astype(np.float32))

    @tf.function
    def step(x, z):
        inner = x + 0.0  # a fresh buffer that TF could hand to the gradient op
        with tf.GradientTape() as tape:
            tape.watch(inner)
            loss = fsl.seg_loss(inner, z, implementation="fused")
        grad = tape.gradient(loss, inner)
        return grad, tf.reduce_sum(inner * 1.0)  # inner is read after the gradient

    grad, total = step(logits, labels)
    np.testing.assert_allclose(float(total), float(tf.reduce_sum(logits)), rtol=1e-5)
    with tf.GradientTape() as tape:
        tape.watch(logits)
        loss = fsl.seg_loss(logits, labels, implementation="reference")
    np.testing.assert_allclose(grad.numpy(), tape.gradient(loss, logits).numpy(), rtol=1e-4,
                               atol=1e-9)


def _raw_gradient(logits, labels, upstream, data_format):
    lib = fsl.ops.library()
    return lib.fused_segloss_stats_grad(
        logits, labels, tf.zeros([0], tf.float32), tf.zeros([], tf.float32), upstream,
        data_format=data_format, squared=False)


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
@pytest.mark.parametrize("classes", [1, 5, 8, 17])
def test_bfloat16_gradient_is_the_float32_gradient_rounded_to_nearest_even(classes,
                                                                           data_format):
    """The bfloat16 store (vector narrowing, csrc/core/segloss_cpu_lanes.h) against TF's own
    float32 -> bfloat16 cast of the same gradient: bit for bit, in full and partial vectors,
    with NaN logits (check_numerics off) giving NaN, never inf or a number."""
    rng = np.random.default_rng(classes)
    shape = (2, 37, 9, classes) if data_format == "channels_last" else (2, classes, 37, 9)
    x = rng.normal(0.0, 3.0, shape).astype(np.float32)
    x.flat[rng.choice(x.size, 5, replace=False)] = np.nan
    logits_bf16 = tf.cast(tf.constant(x), tf.bfloat16)
    labels = tf.constant((rng.random(shape) < 0.4).astype(np.uint8))
    # Upstream gradients of varied magnitude, so that the rounding bits differ per class.
    upstream = tf.constant(rng.normal(0.0, 1.0, (2, classes, 8)).astype(np.float32))
    got = _raw_gradient(logits_bf16, labels, upstream, data_format)
    assert got.dtype == tf.bfloat16
    # bfloat16 -> float32 is exact, so the kernel computes the same float32 gradient here.
    want = tf.cast(_raw_gradient(tf.cast(logits_bf16, tf.float32), labels, upstream,
                                 data_format), tf.bfloat16)
    got_bits = tf.bitcast(got, tf.uint16).numpy()
    want_bits = tf.bitcast(want, tf.uint16).numpy()
    nan = np.isnan(tf.cast(want, tf.float32).numpy())
    assert nan.sum() >= 5
    np.testing.assert_array_equal(np.isnan(tf.cast(got, tf.float32).numpy()), nan)
    np.testing.assert_array_equal(got_bits[~nan], want_bits[~nan])


def _bfloat16_bits_rne(values):
    """float32 -> bfloat16 bits, round to nearest even, in integer NumPy (subnormals kept)."""
    bits = values.astype(np.float32).view(np.uint32).astype(np.uint64)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


@pytest.mark.parametrize("classes", [1, 5, 17])
def test_bfloat16_gradient_keeps_float32_subnormals(classes):
    """The bfloat16 store's fast path (one conversion instruction with AVX-512 BF16) reads a
    subnormal float32 as 0, so vectors holding one take the integer rounding instead. The
    NumPy-called core runs without TF's flush-to-zero, so tiny upstream gradients make
    subnormal float32 gradients here: each must round like any other value, never to 0.
    C = 1 and 5 store whole vectors; C = 17 ends every row in a partial vector, stored lane
    by lane."""
    rng = np.random.default_rng(classes)
    shape = (2, 300, classes)
    x = rng.normal(0.0, 3.0, shape).astype(np.float32)
    z = (rng.random(shape) < 0.4).astype(np.float32)
    # |upstream| ~ 1e-38: products with the O(1) derivatives land below 2^-126 = 1.2e-38.
    upstream = (rng.uniform(0.2, 1.0, (2, classes, 8)) * 1e-38).astype(np.float32)
    bf16 = tf.bfloat16.as_numpy_dtype
    x_bf16 = x.astype(bf16)
    want = core.logit_grad(x_bf16.astype(np.float32), z, grad_stats=upstream)
    subnormal = (want != 0) & (np.abs(want) < np.finfo(np.float32).tiny)
    assert subnormal.mean() > 0.5, "the case must exercise subnormal gradients"
    got = core.logit_grad(x_bf16, z, grad_stats=upstream)
    assert got.dtype == bf16
    np.testing.assert_array_equal(got.view(np.uint16), _bfloat16_bits_rne(want))
    # and the bulk of them stay nonzero in bfloat16 (its exponent range is float32's)
    assert np.count_nonzero(got.view(np.uint16)[subnormal] & 0x7FFF) > 0.9 * subnormal.sum()
