"""Softmax mode (activation="softmax": one class per pixel) on every path: fused op, XLA
custom call and pure-TF reference.

Checked against the float64 NumPy oracle (tests/numpy_softmax.py) for every statistics
column, the gradient and combine; against Keras' SparseCategoricalCrossentropy,
CategoricalCrossentropy and CategoricalFocalCrossentropy, PyTorch's class-weighted
CrossEntropyLoss formula and MONAI's published DiceCELoss / DiceLoss values; against TF
autodiff of an independent float64 formulation and finite differences.
"""
import numpy as np
import pytest
import tensorflow as tf

import fused_segloss as fsl
import numpy_reference as npref
import numpy_softmax as nps
import softmax_helpers as sh

# (id, spatial, C, B, logits dtype, labels kind, weights kind, squared, focal γ, ignore)
# labels kind: "ids" int32 [B, *S], "ids1" uint8 with a class axis of size 1, "int64" ids,
# "onehot" float32, "soft" float soft labels, "uint8" / "bool" one-hot.
CASES = [
    ("2d-ids", (5, 4), 3, 2, "float32", "ids", None, False, 0.0, None),
    ("2d-ids-ignore-pixel", (5, 4), 4, 2, "float32", "ids", "pixel", False, 0.0, 255),
    ("1d-int64-ignore-neg", (7,), 5, 3, "float64", "int64", "full", True, 0.0, -1),
    ("2d-ids1-uint8-focal", (3, 5), 3, 2, "float32", "ids1", "image", False, 2.0, 200),
    ("3d-soft-focal-half", (2, 3, 2), 4, 1, "float64", "soft", "pixel", False, 0.5, None),
    ("0d-onehot", (), 6, 7, "float32", "onehot", None, True, 0.0, None),
    ("1d-uint8-onehot-f16", (9,), 2, 2, "float16", "uint8", None, False, 1.0, None),
    ("2d-bool-bf16-class-w", (4, 3), 3, 2, "bfloat16", "bool", "class", False, 0.0, None),
    ("1d-C1-ids", (6,), 1, 2, "float32", "ids", None, False, 2.0, None),
    ("2d-ids-class-in-range-ignored", (4, 4), 3, 2, "float32", "ids", None, False, 0.0, 0),
]


def _problem(rng, case, data_format):
    _, spatial, classes, batch, dtype, kind, weights, squared, gamma, ignore = case
    channels_last = data_format == "channels_last"
    shape = [batch, *spatial, classes] if channels_last else [batch, classes, *spatial]
    x = sh.logits(rng, shape, tf.as_dtype(dtype).as_numpy_dtype)
    ids = sh.ids(rng, [batch, *spatial], classes, ignore)
    if kind in ("ids", "int64", "ids1"):
        labels = ids.astype({"ids": np.int32, "int64": np.int64, "ids1": np.uint8}[kind])
        if kind == "ids1":
            labels = labels[..., None] if channels_last else labels[:, None]
        oracle_labels = ids
    elif kind == "soft":
        z = rng.random([batch, *spatial, classes])
        z /= z.sum(-1, keepdims=True)
        labels = (z if channels_last else np.moveaxis(z, -1, 1)).astype(np.float32)
        oracle_labels = labels
    else:
        labels = sh.one_hot(ids, classes, data_format).astype(
            {"onehot": np.float32, "uint8": np.uint8, "bool": bool}[kind])
        oracle_labels = labels
        ignore = None
    w = None
    if weights is not None:
        from conftest import weights_shape
        w = rng.uniform(0.0, 2.0, weights_shape(weights, batch, list(spatial), classes,
                                                channels_last)).astype(np.float32)
    options = dict(data_format=data_format, squared=squared, focal_gamma=gamma,
                   ignore_index=ignore if kind in ("ids", "int64", "ids1") else None)
    oracle = dict(data_format=data_format, squared=squared, focal_gamma=gamma,
                  ignore_index=options["ignore_index"])
    return x, labels, w, options, oracle_labels, oracle


def _stats_and_grad(x, labels, w, options, upstream, path):
    def run(logits):
        with tf.GradientTape() as tape:
            tape.watch(logits)
            s = fsl.segloss_stats(logits, labels, w, activation="softmax",
                                  implementation=sh.implementation(path), **options)
        return s, tape.gradient(s, logits, output_gradients=upstream)

    stats, grad = sh.on_path(run, path)(tf.constant(x))
    return stats.numpy(), grad.numpy()


def _grad_scale(x, labels, w, upstream, oracle):
    """Per element j, the sum of the magnitudes of the terms the gradient adds,
    Σ_c |dL/dp_c · p_c| · (δ_cj + p_j) (numpy_softmax.logit_grad's terms, signs dropped):
    the scale of a relative tolerance, as numpy_reference.logit_grad_scale for sigmoid."""
    x64, z, w64 = nps.elements(x, labels, w, oracle["data_format"], oracle["ignore_index"])
    g = np.abs(np.asarray(upstream, np.float64))
    g_ce, g_inter, g_pred = (g[:, None, :, col] for col in (npref.CE_SUM, npref.INTERSECTION,
                                                            npref.PRED_SUM))
    p = nps.softmax(x64)
    gamma, k = oracle["focal_gamma"], 2.0 if oracle["squared"] else 1.0
    with np.errstate(divide="ignore", invalid="ignore"):
        focal = np.where(p < 1.0, gamma * (1.0 - p) ** (gamma - 1.0) * np.abs(np.log(p)) * p,
                         0.0)
    d_p_times_p = w64 * (g_ce * z * (focal + (1.0 - p) ** gamma) + g_inter * z * p
                         + g_pred * k * p ** k)
    scale = d_p_times_p + p * d_p_times_p.sum(-1, keepdims=True)
    shape_last = npref.to_channels_last(np.empty(np.shape(x), np.uint8),
                                         oracle["data_format"]).shape
    return npref.from_channels_last(scale.reshape(shape_last), oracle["data_format"])


@pytest.mark.parametrize("path", sh.PATHS)
@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_stats_and_gradient_match_the_float64_oracle(case, data_format, path, rng, check):
    x, labels, w, options, oracle_labels, oracle = _problem(rng, case, data_format)
    batch, classes = x.shape[0], x.shape[sh.class_axis(x.ndim, data_format)]
    upstream = rng.normal(0.0, 1.0, (batch, classes, 8)).astype(np.float32)
    stats, grad = _stats_and_grad(x, labels, w, options, tf.constant(upstream), path)

    expected = nps.stats(x, oracle_labels, w, **oracle)
    dtype = check.dtype_name(x)
    # The reference sums float32 tensors one term after another (see conftest.stats_rtol).
    rtol = check.STATS_RTOL[dtype] if path != "reference" or dtype == "float64" else 2e-5
    check.stats(stats, expected, dtype, rtol=rtol)

    expected_grad = nps.logit_grad(x, oracle_labels, w, upstream, **oracle)
    scale = _grad_scale(x, oracle_labels, w, upstream, oracle)
    check.grad(grad, expected_grad, scale, dtype)


@pytest.mark.parametrize("path", sh.PATHS)
def test_sparse_forms_and_one_hot_give_the_same_statistics_and_gradient(path, rng):
    for data_format in ("channels_last", "channels_first"):
        shape = [2, 5, 3, 4] if data_format == "channels_last" else [2, 4, 5, 3]
        x = tf.constant(sh.logits(rng, shape))
        ids = sh.ids(rng, [2, 5, 3], 4)
        with_axis = ids[..., None] if data_format == "channels_last" else ids[:, None]
        forms = {"ids": ids.astype(np.int32), "ids-int64": ids.astype(np.int64),
                 "ids-uint8": ids.astype(np.uint8), "ids-class-axis-1": with_axis,
                 "one-hot": sh.one_hot(ids, 4, data_format),
                 "one-hot-uint8": sh.one_hot(ids, 4, data_format).astype(np.uint8),
                 "one-hot-bool": sh.one_hot(ids, 4, data_format).astype(bool)}
        upstream = tf.constant(rng.normal(size=(2, 4, 8)).astype(np.float32))
        results = {name: _stats_and_grad(x, labels, None, dict(data_format=data_format),
                                         upstream, path)
                   for name, labels in forms.items()}
        base_stats, base_grad = results["ids"]
        for name, (stats, grad) in results.items():
            # The same values; dense and sparse labels may take different code (z·(−log p)
            # against −log p_y), so float32 results may differ by a few ulp.
            np.testing.assert_allclose(stats, base_stats, rtol=1e-6, atol=1e-6, err_msg=name)
            np.testing.assert_allclose(grad, base_grad, rtol=1e-6, atol=1e-7, err_msg=name)


# ----------------------------------------------------------------------------------------
# Framework oracles for the CE term (dice_weight=0)

@pytest.mark.parametrize("path", sh.PATHS)
@pytest.mark.parametrize("ignore_class", [None, 3])
def test_ce_is_keras_sparse_categorical_crossentropy(ignore_class, path, rng):
    x = sh.logits(rng, (2, 6, 5, 4))
    ids = sh.ids(rng, (2, 6, 5), 4, ignore_class)
    expected = float(tf.keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, ignore_class=ignore_class)(ids, x))

    def ours(logits):
        return fsl.seg_loss(logits, ids.astype(np.int32), activation="softmax",
                            ignore_index=ignore_class, dice_weight=0.0,
                            implementation=sh.implementation(path))

    assert float(sh.on_path(ours, path)(tf.constant(x))) == pytest.approx(expected, rel=2e-6)


@pytest.mark.parametrize("path", sh.PATHS)
def test_ce_with_one_hot_labels_is_keras_categorical_crossentropy(path, rng):
    x = sh.logits(rng, (3, 7, 5))
    z = sh.one_hot(sh.ids(rng, (3, 7), 5), 5, "channels_last")
    expected = float(tf.keras.losses.CategoricalCrossentropy(from_logits=True)(z, x))

    def ours(logits):
        return fsl.seg_loss(logits, z, activation="softmax", dice_weight=0.0,
                            implementation=sh.implementation(path))

    assert float(sh.on_path(ours, path)(tf.constant(x))) == pytest.approx(expected, rel=2e-6)


@pytest.mark.parametrize("path", sh.PATHS)
@pytest.mark.parametrize("gamma", [0.5, 1.0, 2.0, 5.0])
def test_focal_ce_is_keras_categorical_focal_crossentropy(gamma, path, rng):
    # Keras' per-pixel term is Σ_c alpha·(1 − p_c)^γ·(−z_c log p_c), then the mean over
    # pixels (sum_over_batch_size): with one-hot labels every pixel has weight_sum 1, so
    # our CE (Σ ce_sum / Σ weight_sum) is the same mean. Keras clips p to [1e-7, 1 − 1e-7];
    # logits of scale 2 keep p inside that range.
    x = sh.logits(rng, (2, 6, 5, 3), scale=2.0)
    z = sh.one_hot(sh.ids(rng, (2, 6, 5), 3), 3, "channels_last")
    expected = float(tf.keras.losses.CategoricalFocalCrossentropy(
        from_logits=True, alpha=1.0, gamma=gamma)(z, x))

    def ours(logits):
        return fsl.seg_loss(logits, z, activation="softmax", dice_weight=0.0,
                            focal_gamma=gamma, implementation=sh.implementation(path))

    assert float(sh.on_path(ours, path)(tf.constant(x))) == pytest.approx(expected, rel=2e-6)


@pytest.mark.parametrize("path", sh.PATHS)
def test_class_weighted_ce_is_pytorch_cross_entropy_loss(path, rng):
    """PyTorch's CrossEntropyLoss(weight=cw, ignore_index=k, reduction="mean"):
    Σ_i cw[y_i]·nll_i / Σ_i cw[y_i] over the non-ignored pixels i."""
    cw = np.array([0.5, 2.0, 1.0, 3.0])
    x = sh.logits(rng, (2, 4, 6, 5)).astype(np.float64)            # channels_first [B, C, H, W]
    ids = sh.ids(rng, (2, 6, 5), 4, ignore_index=-100)
    log_p = x - np.log(np.exp(x - x.max(1, keepdims=True)).sum(1, keepdims=True)) \
        - x.max(1, keepdims=True)
    keep = ids != -100
    y = np.where(keep, ids, 0)
    nll = -np.take_along_axis(log_p, y[:, None], axis=1)[:, 0]
    expected = (cw[y] * nll)[keep].sum() / cw[y][keep].sum()

    def ours(logits):
        return fsl.seg_loss_result(logits, ids.astype(np.int64), activation="softmax",
                                   ignore_index=-100, class_weights=cw, dice_weight=0.0,
                                   data_format="channels_first",
                                   implementation=sh.implementation(path))

    res = sh.on_path(ours, path)(tf.constant(x.astype(np.float32)))
    assert float(res.ce) == pytest.approx(expected, rel=2e-6)
    assert float(res.total) == pytest.approx(expected, rel=2e-6)
    assert float(tf.reduce_sum(res.loss_per_class)) == pytest.approx(float(res.total), rel=1e-6)


# ----------------------------------------------------------------------------------------
# Gradients of the whole loss

def _independent_loss(x, ids, weights, class_weights, smooth):
    """CE + (1 − mean Dice) in float64 from tf.nn.log_softmax, written without the package."""
    classes = x.shape[-1]
    log_p = tf.nn.log_softmax(x, axis=-1)
    z = tf.one_hot(ids, classes, dtype=tf.float64)
    w = tf.constant(weights, tf.float64)
    cw = tf.constant(class_weights, tf.float64)
    nll = -tf.reduce_sum(z * log_p, axis=-1, keepdims=True)
    pixel_cw = tf.reduce_sum(z * cw, axis=-1, keepdims=True)
    ce = tf.reduce_sum(w * pixel_cw * nll) / tf.reduce_sum(w * pixel_cw)
    p = tf.exp(log_p)
    axes = [0, 1, 2]
    inter = tf.reduce_sum(w * p * z, axes)
    dice = (2.0 * inter + smooth) / (tf.reduce_sum(w * p, axes) + tf.reduce_sum(w * z, axes)
                                     + smooth)
    return ce + 1.0 - tf.reduce_sum(cw * dice) / tf.reduce_sum(cw)


@pytest.mark.parametrize("path", sh.PATHS)
def test_loss_gradient_is_autodiff_of_an_independent_float64_formulation(path, rng):
    x = sh.logits(rng, (2, 5, 4, 3)).astype(np.float64)
    ids = sh.ids(rng, (2, 5, 4), 3)
    w = rng.uniform(0.5, 2.0, (2, 5, 4, 1))
    cw = np.array([1.0, 2.0, 0.5])
    with tf.GradientTape() as tape:
        xt = tf.constant(x)
        tape.watch(xt)
        want_loss = _independent_loss(xt, ids, w, cw, 1e-5)
    want = tape.gradient(want_loss, xt).numpy()

    def ours(logits):
        with tf.GradientTape() as t:
            t.watch(logits)
            loss = fsl.seg_loss(logits, ids.astype(np.int32), w, activation="softmax",
                                class_weights=cw, implementation=sh.implementation(path))
        return loss, t.gradient(loss, logits)

    loss, grad = sh.on_path(ours, path)(tf.constant(x))
    # combine works in float32 (the stats' dtype): the loss and dL/dstats carry float32
    # rounding, a few 2^-24 relative; 1e-5 of the largest gradient element bounds it.
    assert float(loss) == pytest.approx(float(want_loss), rel=1e-6)
    np.testing.assert_allclose(grad, want, rtol=0, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("path", ["fused", "reference"])
@pytest.mark.parametrize("options", [dict(), dict(focal_gamma=2.0, squared=True),
                                     dict(focal_gamma=0.5, data_format="channels_first")])
def test_compute_gradient_matches_finite_differences(options, path, rng):
    data_format = options.get("data_format", "channels_last")
    shape = (2, 3, 4) if data_format == "channels_last" else (2, 4, 3)
    x = sh.logits(rng, shape, np.float64, scale=1.5)
    ids = sh.ids(rng, (2, 3), 4, ignore_index=5).astype(np.int32)
    weights = rng.uniform(0.5, 2.0, (2, 3, 1) if data_format == "channels_last" else (2, 1, 3))

    def loss(logits):
        return fsl.seg_loss(logits, ids, weights, activation="softmax", ignore_index=5,
                            implementation=sh.implementation(path), **options)

    theoretical, numerical = tf.test.compute_gradient(loss, [tf.constant(x)], delta=1e-3)
    # Central differences of a loss that combine rounds to float32 (~1e-7 relative, loss
    # ~ 2): that rounding over 2·delta is ~2e-4 of noise per element; the truncation error
    # (delta² times the third derivative, / 6) is ~1e-7. atol 1e-3 covers both and still
    # catches any wrong term.
    np.testing.assert_allclose(theoretical[0], numerical[0], atol=1e-3)


def test_second_order_gradient_raises_a_clear_error(rng):
    x = tf.constant(sh.logits(rng, (2, 4, 3)))
    ids = sh.ids(rng, (2, 4), 3).astype(np.int32)
    with pytest.raises((NotImplementedError, LookupError), match="FusedSeglossStats"):
        with tf.GradientTape() as outer:
            outer.watch(x)
            with tf.GradientTape() as inner:
                inner.watch(x)
                loss = fsl.seg_loss(x, ids, activation="softmax", implementation="fused")
            grad = inner.gradient(loss, x)
        outer.gradient(grad, x)


def test_fused_graph_has_no_softmax_or_exp_ops(rng):
    x = tf.constant(sh.logits(rng, (2, 6, 5, 4)))
    ids = tf.constant(sh.ids(rng, (2, 6, 5), 4).astype(np.int32))

    @tf.function
    def step(logits, labels):
        with tf.GradientTape() as tape:
            tape.watch(logits)
            loss = fsl.seg_loss(logits, labels, activation="softmax", ignore_index=255,
                                focal_gamma=2.0, implementation="fused")
        return loss, tape.gradient(loss, logits)

    graph = step.get_concrete_function(x, ids).graph
    types = {op.type for op in graph.get_operations()}
    for function in graph.as_graph_def().library.function:
        types |= {node.op for node in function.node_def}
    assert "FusedSeglossStats" in types and "FusedSeglossStatsGrad" in types
    full_size = {"Softmax", "LogSoftmax", "Exp", "OneHot", "SparseSoftmaxCrossEntropyWithLogits"}
    assert not types & full_size, types & full_size


def test_xla_with_a_dynamic_batch_matches_the_op(rng):
    x = sh.logits(rng, (3, 5, 4, 4))
    ids = sh.ids(rng, (3, 5, 4), 4, ignore_index=255).astype(np.uint8)
    w = rng.uniform(0.0, 2.0, (3, 5, 4, 1)).astype(np.float32)
    options = dict(activation="softmax", ignore_index=255, focal_gamma=1.0,
                   class_weights=[1.0, 2.0, 1.0, 0.5], include_background=False)

    def step(logits, labels, weights):
        with tf.GradientTape() as tape:
            tape.watch(logits)
            loss = fsl.seg_loss(logits, labels, weights, **options)
        return loss, tape.gradient(loss, logits)

    signature = [tf.TensorSpec([None, 5, 4, 4], tf.float32),
                 tf.TensorSpec([None, 5, 4], tf.uint8), tf.TensorSpec([None, 5, 4, 1])]
    compiled = tf.function(step, jit_compile=True, input_signature=signature)
    for batch in (3, 1):
        args = [tf.constant(a[:batch]) for a in (x, ids, w)]
        got_loss, got_grad = compiled(*args)
        want_loss, want_grad = step(*args)
        # The same kernels; only combine's few float32 ops may be reordered by XLA.
        assert float(got_loss) == pytest.approx(float(want_loss), rel=1e-6)
        np.testing.assert_allclose(got_grad, want_grad, rtol=1e-5, atol=1e-8)


# ----------------------------------------------------------------------------------------
# Sigmoid mode: integer masks

@pytest.mark.parametrize("path", sh.PATHS)
def test_sigmoid_accepts_int32_and_int64_masks_like_float(path, rng):
    x = tf.constant(sh.logits(rng, (2, 5, 3)))
    z = (rng.random((2, 5, 3)) < 0.4)

    def stats(labels):
        return sh.on_path(lambda v: fsl.segloss_stats(
            v, labels, implementation=sh.implementation(path)), path)(x).numpy()

    want = stats(z.astype(np.float32))
    for dtype in (np.int32, np.int64):
        np.testing.assert_array_equal(stats(z.astype(dtype)), want)
