"""The CPU kernels of softmax mode (fused_segloss._core, activation="softmax") and the raw TF
ops against the float64 NumPy oracle (numpy_softmax.py): every logits dtype, dense
(float, uint8, bool) and sparse (uint8, int32, int64) labels, both layouts, C = 1 to 150,
weights broadcast kinds, ignore_index, squared, focal; plus sparse == one-hot bit for bit,
bitwise determinism across thread counts, invalid class ids, extreme logits and argmax
ties. Tolerances are conftest.py's (per logits dtype, with reasons)."""
import numpy as np
import pytest
import tensorflow as tf

import numpy_softmax as npsm
from fused_segloss import _core

BF16 = tf.bfloat16.as_numpy_dtype
DTYPES = {"float32": np.float32, "float64": np.float64, "float16": np.float16, "bfloat16": BF16}


def _layout(data_format, batch, positions, classes):
    return [batch, positions, classes] if data_format == "channels_last" else [batch, classes,
                                                                                positions]


def make_case(rng, *, batch=2, positions=203, classes=5, data_format="channels_last",
              logits_dtype="float32", labels="uint8-ids", weights=None, ignore_index=None,
              extreme=False):
    """logits, labels and canonical rank-3 weights of a random softmax problem.

    labels: "<dtype>-ids" (sparse class ids, some equal to ignore_index when given),
    "<dtype>-onehot" (dense one-hot) or "<dtype>-soft" (dense values in [0, 1]).
    weights: None, "pixel" [B, N, 1], "full" [B, N, C] or "class" [1, 1, C] (canonical view).
    """
    shape = _layout(data_format, batch, positions, classes)
    x = rng.normal(0.0, 3.0, shape)
    if extreme:
        x[rng.random(shape) < 0.3] = 1e4
        x[rng.random(shape) < 0.3] = -1e4
    ids = rng.integers(0, classes, (batch, positions))
    kind_dtype, kind = labels.split("-")
    dtype = {"bool": bool, "bfloat16": BF16}.get(kind_dtype, kind_dtype)
    if kind == "ids":
        if ignore_index is not None:
            ids[rng.random(ids.shape) < 0.15] = ignore_index
        z = ids.astype(dtype)
    else:
        dense = np.eye(classes)[ids]  # [B, N, C]
        if kind == "soft":
            dense = rng.random(dense.shape)
            dense[rng.random(dense.shape) < 0.05] = 0.5  # the hard-label boundary
            dense[rng.random(dense.shape) < 0.1] = 1.0
        if data_format == "channels_first":
            dense = np.moveaxis(dense, -1, 1)
        z = dense.astype(dtype)
    w = None
    if weights is not None:
        wshape = {"pixel": _layout(data_format, batch, positions, 1),
                  "full": shape, "class": _layout(data_format, 1, 1, classes)}[weights]
        w = rng.uniform(0.0, 2.0, wshape)
        w[rng.random(wshape) < 0.2] = 0.0
        w = w.astype(np.float32)
    return x.astype(DTYPES[logits_dtype]), z, w


def core_stats(x, z, w, data_format, threads=1, **options):
    return _core.stats(x, z, w, None, channels_last=data_format == "channels_last",
                       threads=threads, activation="softmax", **options)


def core_grad(x, z, w, upstream, data_format, threads=1, **options):
    return _core.logit_grad(x, z, w, None, upstream, channels_last=data_format == "channels_last",
                            threads=threads, activation="softmax", **options)


def grad_scale(x, z, w, upstream, data_format, squared=False, ignore_index=None,
               focal_gamma=0.0):
    """Per element, the magnitudes of what dL/dx_j adds up: t_j + p_j·Σ_c t_c with t_c a bound
    of |u_c| (the focal factor's (1 + γ·p·r) is at most 1 + γ)."""
    xs, zs, ws = npsm.elements(x, z, w, data_format, ignore_index)
    p = npsm.softmax(xs)
    g = np.abs(np.asarray(upstream, np.float64))[:, None]  # [B, 1, C, 8]
    k = 2.0 if squared else 1.0
    t = ws * (g[..., 0] * zs * (1.0 + focal_gamma) + (g[..., 2] * zs + g[..., 3] * k) * p)
    scale = t + p * t.sum(axis=-1, keepdims=True)
    shape_last = np.moveaxis(np.empty(x.shape), 1, -1).shape if data_format == "channels_first" \
        else x.shape
    scale = scale.reshape(shape_last)
    return np.moveaxis(scale, -1, 1) if data_format == "channels_first" else scale


def check_case(rng, check, case, squared=False, ignore_index=None, focal_gamma=0.0, threads=1):
    x, z, w, data_format = case
    options = dict(squared=squared, ignore_index=ignore_index, focal_gamma=focal_gamma)
    dtype = check.dtype_name(x)
    stats = core_stats(x, z, w, data_format, threads=threads, **options)
    expected = npsm.stats(x, z, w, data_format=data_format, **options)
    check.stats(stats, expected, dtype)
    upstream = rng.normal(0.0, 1.0, expected.shape).astype(np.float32)
    grad = core_grad(x, z, w, upstream, data_format, threads=threads, **options)
    wanted = npsm.logit_grad(x, z, w, upstream, data_format=data_format, **options)
    scale = grad_scale(x, z, w, upstream, data_format, **options)
    check.grad(grad, wanted, scale, dtype)
    return stats, grad


LAYOUTS = ("channels_last", "channels_first")


@pytest.mark.parametrize("data_format", LAYOUTS)
@pytest.mark.parametrize("logits_dtype", list(DTYPES))
@pytest.mark.parametrize("labels", ["uint8-ids", "float32-soft"])
def test_every_logits_dtype(rng, check, data_format, logits_dtype, labels):
    case = make_case(rng, data_format=data_format, logits_dtype=logits_dtype, labels=labels,
                     weights="pixel")
    check_case(rng, check, (*case, data_format))


@pytest.mark.parametrize("data_format", LAYOUTS)
@pytest.mark.parametrize("labels", ["float32-soft", "float16-soft", "float64-soft",
                                    "uint8-onehot", "bool-onehot", "int32-ids", "int64-ids"])
def test_every_labels_kind(rng, check, data_format, labels):
    case = make_case(rng, data_format=data_format, labels=labels, classes=4, positions=97)
    check_case(rng, check, (*case, data_format))


@pytest.mark.parametrize("data_format", LAYOUTS)
@pytest.mark.parametrize("classes,positions", [(1, 203), (2, 203), (21, 101), (150, 37)])
def test_class_counts(rng, check, data_format, classes, positions):
    case = make_case(rng, data_format=data_format, classes=classes, positions=positions,
                     labels="int32-ids")
    check_case(rng, check, (*case, data_format))


@pytest.mark.parametrize("data_format", LAYOUTS)
@pytest.mark.parametrize("weights", [None, "pixel", "full", "class"])
@pytest.mark.parametrize("labels", ["uint8-ids", "float32-soft"])
def test_weights(rng, check, data_format, weights, labels):
    case = make_case(rng, data_format=data_format, weights=weights, labels=labels)
    check_case(rng, check, (*case, data_format))


@pytest.mark.parametrize("data_format", LAYOUTS)
@pytest.mark.parametrize("labels,ignore_index,classes",
                         [("uint8-ids", 255, 5), ("int64-ids", -1, 5), ("int32-ids", 2, 5),
                          ("uint8-ids", 255, 150)])
def test_ignore_index(rng, check, data_format, labels, ignore_index, classes):
    case = make_case(rng, data_format=data_format, labels=labels, classes=classes,
                     positions=61, ignore_index=ignore_index, weights="pixel")
    stats, _ = check_case(rng, check, (*case, data_format), ignore_index=ignore_index)
    ids = case[1].astype(np.int64)
    assert stats[..., 1].sum() < (ids != ignore_index).sum()  # weights 0..2, some ignored
    assert stats[..., 7].sum() > 0


@pytest.mark.parametrize("data_format", LAYOUTS)
@pytest.mark.parametrize("squared,focal_gamma", [(True, 0.0), (False, 0.5), (True, 2.0)])
@pytest.mark.parametrize("labels", ["int64-ids", "float32-soft"])
def test_squared_and_focal(rng, check, data_format, squared, focal_gamma, labels):
    case = make_case(rng, data_format=data_format, labels=labels, weights="full", classes=7)
    check_case(rng, check, (*case, data_format), squared=squared, focal_gamma=focal_gamma)


@pytest.mark.parametrize("data_format", LAYOUTS)
@pytest.mark.parametrize("logits_dtype", ["float32", "float64"])
def test_sparse_and_one_hot_give_the_same_bits(rng, data_format, logits_dtype):
    x, ids, _ = make_case(rng, data_format=data_format, logits_dtype=logits_dtype,
                          labels="int32-ids", ignore_index=-1, classes=6)
    keep = (ids != -1).astype(np.float32)
    one_hot = np.eye(6, dtype=np.float32)[np.where(ids >= 0, ids, 0)] * keep[..., None]
    pixel = keep[..., None]
    if data_format == "channels_first":
        one_hot, pixel = np.moveaxis(one_hot, -1, 1), np.moveaxis(pixel, -1, 1)
    upstream = rng.normal(0.0, 1.0, (x.shape[0], 6, 8)).astype(np.float32)
    for dense in (one_hot, one_hot.astype(np.uint8)):
        for w_sparse, w_dense in ((None, pixel), (pixel * 0.5, pixel * 0.5)):
            sparse_stats = core_stats(x, ids, w_sparse, data_format, ignore_index=-1)
            dense_stats = core_stats(x, dense, w_dense, data_format)
            assert sparse_stats.tobytes() == dense_stats.tobytes()
            sparse_grad = core_grad(x, ids, w_sparse, upstream, data_format, ignore_index=-1)
            dense_grad = core_grad(x, dense, w_dense, upstream, data_format)
            assert sparse_grad.tobytes() == dense_grad.tobytes()


@pytest.mark.parametrize("data_format", LAYOUTS)
@pytest.mark.parametrize("labels,classes,positions",
                         [("uint8-ids", 21, 3500), ("float32-soft", 5, 7000), ("int32-ids", 2, 17000)])
def test_bitwise_identical_across_thread_counts(rng, check, data_format, labels, classes,
                                                positions):
    """Several work items per image (their size depends on C): the sums are combined in a
    fixed order, whatever the threads."""
    x, z, w = make_case(rng, batch=3, positions=positions, classes=classes,
                        data_format=data_format, labels=labels, weights="pixel")
    upstream = rng.normal(0.0, 1.0, (3, classes, 8)).astype(np.float32)
    results = [(core_stats(x, z, w, data_format, threads=t),
                core_grad(x, z, w, upstream, data_format, threads=t)) for t in (1, 2, 4)]
    for stats, grad in results[1:]:
        assert stats.tobytes() == results[0][0].tobytes()
        assert grad.tobytes() == results[0][1].tobytes()
    check.stats(results[0][0], npsm.stats(x, z, w, data_format=data_format), "float32")


@pytest.mark.parametrize("data_format", LAYOUTS)
@pytest.mark.parametrize("labels,bad,ignore_index",
                         [("uint8-ids", [7, 9], 255), ("int32-ids", [-3, 5], None),
                          ("int64-ids", [-2, 2 ** 40], -1)])
def test_invalid_class_ids_are_an_error(rng, data_format, labels, bad, ignore_index):
    x, z, _ = make_case(rng, data_format=data_format, labels=labels, classes=5,
                        ignore_index=ignore_index)
    z[0, 3], z[1, 50], z[1, 51] = bad[0], bad[1], bad[1]
    with pytest.raises(ValueError) as info:
        core_stats(x, z, None, data_format, ignore_index=ignore_index)
    message = str(info.value)
    assert "`labels`" in message and "[0, 5)" in message, message
    assert f"found 3 id(s) outside, from {min(bad)} to {max(bad)}" in message, message
    if ignore_index is not None:
        assert f"ignore_index = {ignore_index}" in message, message
    # The gradient trusts its inputs but never reads out of bounds: bad ids are ignored.
    upstream = rng.normal(0.0, 1.0, (2, 5, 8)).astype(np.float32)
    grad = core_grad(x, z, None, upstream, data_format, ignore_index=ignore_index)
    ignored = z.astype(np.int64)
    ignored = np.where((ignored < 0) | (ignored >= 5), -7, ignored)
    expected = core_grad(x, ignored, None, upstream, data_format, ignore_index=-7)
    assert grad.tobytes() == expected.tobytes()


@pytest.mark.parametrize("labels,message", [
    ("float32-soft", "`labels` must lie in [0, 1]"),
    ("weights", "`weights` must be finite and >= 0"),
])
def test_invalid_dense_labels_and_weights_are_an_error(rng, labels, message):
    x, z, w = make_case(rng, labels="float32-soft", weights="pixel")
    if labels == "weights":
        w[1, 7, 0] = -1.0
    else:
        z[0, 4, 2] = np.nan
        z[1, 9, 0] = 1.5
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        core_stats(x, z, w, "channels_last")


def test_softmax_option_errors(rng):
    x, z, _ = make_case(rng, labels="uint8-ids")
    pw = np.ones(5, np.float32)
    with pytest.raises(ValueError, match="`pos_weight` has no meaning"):
        _core.stats(x, z, None, pw, activation="softmax")
    with pytest.raises(ValueError, match="`focal_alpha` has no meaning"):
        _core.stats(x, z, None, None, activation="softmax", focal_alpha=0.25)
    with pytest.raises(ValueError, match="`ignore_index` needs sparse"):
        _core.stats(x, np.eye(5, dtype=np.float32)[z], None, None, activation="softmax",
                    ignore_index=0)
    with pytest.raises(ValueError, match="int32"):
        _core.stats(x, z.astype(np.int16), None, None, activation="softmax")


def stable_logit_grad(x, z, w, upstream, data_format, focal_gamma=0.0):
    """float64 dL/dx for logits whose p underflows to 0 (where numpy_softmax.logit_grad meets
    0·inf): the chain rule with each term's p·d/dp taken in closed form,
    p·d[(1-p)^γ·(-log p)]/dp = -(1-p)^γ·(1 + γ·p·(-log p)/(1-p)), and -log p from the
    log-sum-exp (finite for any logits)."""
    xs, zs, ws = npsm.elements(x, z, w, data_format, None)
    m = xs.max(axis=-1, keepdims=True)
    neg_log_p = np.log(np.exp(xs - m).sum(axis=-1, keepdims=True)) - (xs - m)
    p = np.exp(-neg_log_p)
    q = 1.0 - p
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(q > 0, neg_log_p / q, 1.0)
    gamma = focal_gamma
    g = np.asarray(upstream, np.float64)[:, None]
    d = ws * (-g[..., 0] * zs * q ** gamma * (1.0 + gamma * p * ratio) + g[..., 2] * zs * p +
              g[..., 3] * p)
    grad = d - p * d.sum(axis=-1, keepdims=True)
    if data_format == "channels_first":
        return np.moveaxis(grad.reshape(np.moveaxis(np.empty(x.shape), 1, -1).shape), -1, 1)
    return grad.reshape(x.shape)


@pytest.mark.parametrize("data_format", LAYOUTS)
@pytest.mark.parametrize("labels", ["int32-ids", "float32-soft"])
def test_extreme_logits_stay_finite(rng, check, data_format, labels):
    x, z, w = make_case(rng, data_format=data_format, labels=labels, extreme=True, weights="pixel")
    stats = core_stats(x, z, w, data_format, focal_gamma=0.5)
    check.stats(stats, npsm.stats(x, z, w, data_format=data_format, focal_gamma=0.5), "float32")
    upstream = rng.normal(0.0, 1.0, stats.shape).astype(np.float32)
    for gamma in (0.0, 0.5, 1.0, 2.0, 5.0):
        grad = core_grad(x, z, w, upstream, data_format, focal_gamma=gamma)
        wanted = stable_logit_grad(x, z, w, upstream, data_format, focal_gamma=gamma)
        scale = grad_scale(x, z, w, upstream, data_format, focal_gamma=gamma)
        check.grad(grad, wanted, scale, "float32", what=f"gradient, focal_gamma={gamma}")
    # and the stable form agrees with the oracle where the oracle is finite
    moderate = make_case(rng, data_format=data_format, labels=labels, weights="pixel")
    np.testing.assert_allclose(
        stable_logit_grad(*moderate, upstream, data_format, focal_gamma=0.5),
        npsm.logit_grad(*moderate, upstream, data_format=data_format, focal_gamma=0.5),
        rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("data_format", LAYOUTS)
def test_argmax_ties_go_to_the_lowest_index(data_format):
    x = np.array([[[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0], [-1.0, -5.0, -1.0, 4.0]]],
                 np.float32)  # [1, 3, 4]: argmax 1, 0, 3
    z = np.array([[2, 0, 2]], np.uint8)
    if data_format == "channels_first":
        x = np.moveaxis(x, -1, 1).copy()
    stats = core_stats(x, z, None, data_format)
    np.testing.assert_array_equal(stats[0, :, 6], [1, 1, 0, 1])  # hard_pred
    np.testing.assert_array_equal(stats[0, :, 5], [1, 0, 0, 0])  # hard_tp
    np.testing.assert_array_equal(stats[0, :, 7], [1, 0, 2, 0])  # hard_label


def test_two_spatial_dims_and_empty_batch(rng, check):
    x = rng.normal(0.0, 2.0, (2, 9, 11, 3)).astype(np.float32)
    z = rng.integers(0, 3, (2, 9, 11)).astype(np.int64)
    check.stats(_core.stats(x, z, activation="softmax"), npsm.stats(x, z), "float32")
    empty = _core.stats(np.zeros((0, 4, 3), np.float32), np.zeros((0, 4), np.uint8),
                        activation="softmax")
    assert empty.shape == (0, 3, 8)


# ------------------------------------------------------------------------------ TF raw ops
@pytest.fixture(scope="module")
def ops():
    import fused_segloss.ops as fops
    library = fops.library()
    if library is None:
        pytest.skip("the op library is not built")
    return library


@pytest.mark.parametrize("data_format", LAYOUTS)
@pytest.mark.parametrize("labels,ignore_index", [("int64-ids", 3), ("uint8-ids", 255),
                                                 ("int32-ids", None), ("float16-soft", None)])
def test_raw_tf_ops_match_oracle(ops, rng, check, data_format, labels, ignore_index):
    x, z, w = make_case(rng, data_format=data_format, labels=labels, weights="pixel",
                        ignore_index=ignore_index, positions=45)
    attrs = dict(data_format=data_format, activation="softmax",
                 has_ignore_index=ignore_index is not None,
                 ignore_index=0 if ignore_index is None else ignore_index)
    stats = ops.fused_segloss_stats(x, z, w, tf.zeros([]), **attrs).numpy()
    options = dict(data_format=data_format, ignore_index=ignore_index)
    expected = npsm.stats(x, z, w, **options)
    check.stats(stats, expected, "float32")
    upstream = rng.normal(0.0, 1.0, stats.shape).astype(np.float32)
    grad = ops.fused_segloss_stats_grad(x, z, tf.zeros([0]), tf.zeros([]), upstream,
                                        **attrs).numpy()
    wanted = npsm.logit_grad(x, z, None, upstream, **options)
    check.grad(grad, wanted, grad_scale(x, z, None, upstream, data_format,
                                        ignore_index=ignore_index), "float32")


def test_raw_tf_op_reports_invalid_ids(ops, rng):
    x, z, _ = make_case(rng, labels="int32-ids")
    z[0, 0] = 9
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"`labels` class ids.*\[0, 5\)"):
        ops.fused_segloss_stats(x, z, tf.zeros([0]), tf.zeros([]), activation="softmax")
