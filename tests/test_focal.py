"""The focal cross-entropy (focal_gamma, focal_alpha) on every path: fused op, XLA custom
call, pure-TF reference, the CUDA kernels' host simulation and the Keras loss.

ce_sum term = w·a_t·(1 - p_t)^gamma·ce (every other column unchanged), checked against
the float64 NumPy oracle, Keras' BinaryFocalCrossentropy, TF autodiff of an independent
float64 formulation and finite differences; the defaults are the plain path bit for bit.
"""
import numpy as np
import pytest
import tensorflow as tf

import fused_segloss as fsl
import numpy_reference as npref

PATHS = ("fused", "xla", "reference")
# (logits dtype, layout, weights kind, pos_weight, soft labels)
ORACLE_CASES = [
    ("float32", "channels_last", None, False, False),
    ("float32", "channels_first", "pixel", True, True),
    ("float64", "channels_last", "full", True, True),
    ("float16", "channels_last", "class", False, True),
    ("bfloat16", "channels_first", None, True, False),
    ("float32", "channels_last", "row", False, True),
]


def _stats_and_grad(prob, upstream, path, **focal):
    """(stats, dL/dlogits) of segloss_stats on one path, for upstream dL/dstats."""
    (x, z, w, pw), kwargs = prob.args()

    def run(logits):
        with tf.GradientTape() as tape:
            tape.watch(logits)
            s = fsl.segloss_stats(logits, z, w, pw, **kwargs, **focal,
                                  implementation="reference" if path == "reference" else "auto")
        return s, tape.gradient(s, logits, output_gradients=upstream)

    if path == "xla":
        run = tf.function(run, jit_compile=True)
    stats, grad = run(tf.constant(x))
    return stats.numpy(), grad.numpy()


def _upstream(rng, prob):
    b = prob.logits.shape[0]
    c = prob.logits.shape[-1 if prob.data_format == "channels_last" else 1]
    return tf.constant(rng.normal(0.0, 1.0, (b, c, 8)).astype(np.float32))


@pytest.mark.parametrize("path", PATHS)
def test_default_options_are_bitwise_the_plain_path(path, problem, rng):
    for options in (dict(weights="pixel", pos_weight=True, soft=True),
                    dict(logits_dtype="float16", data_format="channels_first")):
        prob = problem(**options)
        upstream = _upstream(rng, prob)
        plain = _stats_and_grad(prob, upstream, path)
        explicit = _stats_and_grad(prob, upstream, path, focal_gamma=0.0, focal_alpha=None)
        for a, b in zip(plain, explicit):
            assert a.tobytes() == b.tobytes()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("alpha", [None, 0.25])
@pytest.mark.parametrize("gamma", [0.5, 1.0, 2.0, 5.0])
def test_ce_term_is_keras_binary_focal_crossentropy(gamma, alpha, path, rng):
    logits = rng.normal(0.0, 2.0, (2, 6, 5, 3)).astype(np.float32)
    labels = (rng.random(logits.shape) < 0.4).astype(np.float32)
    keras_loss = tf.keras.losses.BinaryFocalCrossentropy(
        from_logits=True, gamma=gamma, apply_class_balancing=alpha is not None,
        alpha=0.25 if alpha is None else alpha)
    expected = float(keras_loss(labels, logits))

    def ours(x):
        return fsl.seg_loss(x, labels, dice_weight=0.0, focal_gamma=gamma, focal_alpha=alpha,
                            implementation="reference" if path == "reference" else "auto")

    if path == "xla":
        ours = tf.function(ours, jit_compile=True)
    assert float(ours(tf.constant(logits))) == pytest.approx(expected, rel=2e-5)


@pytest.mark.parametrize("path", ("fused", "reference"))
@pytest.mark.parametrize("gamma", [0.5, 2.0])
@pytest.mark.parametrize("case", ORACLE_CASES, ids=lambda c: "-".join(map(str, c)))
def test_stats_and_gradient_match_numpy(case, gamma, path, problem, rng, check):
    dtype, layout, weights, pos_weight, soft = case
    alpha = 0.25 if pos_weight else None
    prob = problem(logits_dtype=dtype, data_format=layout, weights=weights,
                   pos_weight=pos_weight, soft=soft, spatial=(5, 4), classes=3)
    upstream = _upstream(rng, prob)
    stats, grad = _stats_and_grad(prob, upstream, path, focal_gamma=gamma, focal_alpha=alpha)
    args, kwargs = prob.args()
    focal = dict(focal_gamma=gamma, focal_alpha=alpha)
    check.stats(stats, npref.stats(*args, **kwargs, **focal), dtype,
                rtol=check.stats_rtol(prob, path))
    expected = npref.logit_grad(*args, grad_stats=upstream.numpy(), **kwargs, **focal)
    scale = npref.logit_grad_scale(*args, grad_stats=upstream.numpy(), **kwargs, **focal)
    # The reference rounds p and its log-sigmoids to float32 separately (no fused forms).
    extra = 1e-5 * (1.0 + gamma) if path == "reference" and dtype != "float64" else 0.0
    floor = None
    if path == "reference" and dtype != "float64":
        floor = check.COMPUTE_EPS[dtype] * (1.0 + gamma) * 8.0 * np.abs(expected).max()
    check.grad(grad, expected, scale, dtype, extra_rtol=extra, floor=floor)


def test_xla_is_bitwise_the_fused_op_with_focal(problem, rng):
    prob = problem(weights="pixel", pos_weight=True, soft=True, spatial=(9,))
    upstream = _upstream(rng, prob)
    focal = dict(focal_gamma=1.5, focal_alpha=0.3)
    for a, b in zip(_stats_and_grad(prob, upstream, "fused", **focal),
                    _stats_and_grad(prob, upstream, "xla", **focal)):
        assert a.tobytes() == b.tobytes()


def _independent_ce_sum(x, z, w, pw, gamma, alpha):
    """Column 0 in float64 straight from the definition (channels_last, [B, N, C])."""
    p = tf.sigmoid(x)
    p_t = z * p + (1.0 - z) * (1.0 - p)
    a_t = 1.0 if alpha is None else z * alpha + (1.0 - z) * (1.0 - alpha)
    ce = -(pw * z * tf.math.log(p) + (1.0 - z) * tf.math.log(1.0 - p))
    return tf.reduce_sum(w * a_t * (1.0 - p_t) ** gamma * ce, axis=1)


@pytest.mark.parametrize("alpha", [None, 0.75])  # the kernels take float32 options
@pytest.mark.parametrize("gamma", [0.5, 2.0])
def test_gradient_is_autodiff_of_an_independent_formulation(gamma, alpha, rng):
    x = rng.normal(0.0, 2.5, (2, 40, 3))
    z = rng.random(x.shape)
    z[rng.random(x.shape) < 0.5] = 1.0
    w = rng.uniform(0.0, 2.0, x.shape).astype(np.float32)
    pw = rng.uniform(0.5, 3.0, 3).astype(np.float32)
    upstream = np.zeros((2, 3, 8))
    upstream[..., 0] = rng.normal(0.0, 1.0, (2, 3)).astype(np.float32)
    logits = tf.constant(x)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(logits)
        mine = _independent_ce_sum(logits, z, w.astype(np.float64), pw.astype(np.float64),
                                   gamma, alpha)
        fused = fsl.segloss_stats(logits, z, w, pw, focal_gamma=gamma, focal_alpha=alpha,
                                  implementation="fused")
    np.testing.assert_allclose(fused[..., 0].numpy(), mine.numpy(), rtol=1e-6)
    want = tape.gradient(mine, logits, output_gradients=tf.constant(upstream[..., 0]))
    got = tape.gradient(fused, logits, output_gradients=tf.constant(upstream, tf.float32))
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("implementation", ("fused", "reference"))
def test_compute_gradient_float64(implementation, rng):
    x = rng.normal(0.0, 2.0, (2, 3, 2))
    z = rng.random(x.shape)
    coeff = tf.constant(rng.normal(0.0, 1.0, (2, 2, 8)))

    def f(logits):
        s = fsl.segloss_stats(logits, z, focal_gamma=0.7, focal_alpha=0.4,
                              implementation=implementation)
        return tf.reduce_sum(tf.cast(s, tf.float64) * coeff)

    theoretical, numerical = tf.test.compute_gradient(f, [tf.constant(x)], delta=1e-4)
    # The statistics are float32, so the finite difference carries ~1e-7 / delta error.
    np.testing.assert_allclose(theoretical[0], numerical[0], rtol=1e-3, atol=2e-3)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("gamma", [0.5, 1.0, 2.0, 5.0])
def test_extreme_logits_stay_finite(gamma, path, problem, rng, check):
    for dtype in ("float32", "float64"):
        prob = problem(extreme=True, soft=True, logits_dtype=dtype, spatial=(6, 5))
        x = prob.logits.astype(np.float64)
        agree = (np.abs(x) >= 1e4) & (rng.random(x.shape) < 0.5)  # p_t -> 1: the label agrees
        labels = np.where(agree, x > 0, prob.labels).astype(prob.labels.dtype)
        prob = prob._replace(labels=labels)
        upstream = _upstream(rng, prob)
        stats, grad = _stats_and_grad(prob, upstream, path, focal_gamma=gamma,
                                      focal_alpha=0.25)
        assert np.isfinite(stats).all() and np.isfinite(grad).all()
        args, kwargs = prob.args()
        check.stats(stats, npref.stats(*args, **kwargs, focal_gamma=gamma, focal_alpha=0.25),
                    dtype, rtol=check.stats_rtol(prob, path))


# ----------------------------------------------------------------------------------------
# The CUDA kernels' code on the host, and the CPU core's determinism

core = pytest.importorskip("fused_segloss._core")


@pytest.mark.parametrize("shape", [(2, 37, 3), (1, 700, 1), (3, 50, 33)])
@pytest.mark.parametrize("channels_last", [True, False])
def test_cuda_host_simulation_with_focal(shape, channels_last, rng):
    if not hasattr(core, "simulate_cuda_stats"):
        pytest.skip("built without the CUDA host simulation")
    b, n, c = shape
    dims = (b, n, c) if channels_last else (b, c, n)
    x = rng.normal(0.0, 3.0, dims).astype(np.float32)
    x[rng.random(dims) < 0.1] = 1e4
    z = rng.random(dims).astype(np.float32)
    z[rng.random(dims) < 0.5] = 1.0
    pw = rng.uniform(0.5, 3.0, c).astype(np.float32)
    g = rng.normal(0.0, 1.0, (b, c, 8)).astype(np.float32)
    fmt = "channels_last" if channels_last else "channels_first"
    for gamma, alpha in ((0.5, -1.0), (2.0, 0.25)):
        focal = dict(focal_gamma=gamma, focal_alpha=alpha)
        oracle = dict(focal_gamma=gamma, focal_alpha=None if alpha < 0 else alpha)
        sim = core.simulate_cuda_stats(x, z, None, pw, channels_last, **focal)
        np.testing.assert_allclose(sim, core.stats(x, z, None, pw, channels_last, **focal),
                                   rtol=2e-5, atol=1e-30)
        np.testing.assert_allclose(sim, npref.stats(x, z, None, pw, fmt, **oracle),
                                   rtol=2e-5, atol=1e-30)
        grad = core.simulate_cuda_grad(x, z, None, pw, g, channels_last, **focal)
        expected = npref.logit_grad(x, z, None, pw, g, fmt, **oracle)
        scale = npref.logit_grad_scale(x, z, None, pw, g, fmt, **oracle)
        assert np.all(np.abs(grad - expected) <= 1e-5 * scale + 1e-30)


def test_core_is_bitwise_identical_across_thread_counts_with_focal(rng):
    x = rng.normal(0.0, 3.0, (3, 4099, 5)).astype(np.float32)
    z = rng.random(x.shape).astype(np.float32)
    g = rng.normal(0.0, 1.0, (3, 5, 8)).astype(np.float32)
    focal = dict(focal_gamma=0.5, focal_alpha=0.25)
    runs = [(core.stats(x, z, None, None, True, False, t, **focal),
             core.logit_grad(x, z, None, None, g, True, False, t, **focal)) for t in (1, 2, 3, 8)]
    for stats, grad in runs[1:]:
        assert stats.tobytes() == runs[0][0].tobytes() and grad.tobytes() == runs[0][1].tobytes()


# ----------------------------------------------------------------------------------------
# Bad options and Keras

@pytest.mark.parametrize("name,value", [("focal_gamma", -0.5), ("focal_gamma", float("nan")),
                                        ("focal_gamma", float("inf")), ("focal_gamma", "2"),
                                        ("focal_alpha", 1.5), ("focal_alpha", -0.1),
                                        ("focal_alpha", float("nan"))])
def test_bad_focal_options_raise_naming_the_argument(name, value):
    x = np.zeros((1, 4, 2), np.float32)
    calls = [lambda: fsl.segloss_stats(x, x, **{name: value}),
             lambda: fsl.seg_loss(x, x, **{name: value}),
             lambda: fsl.reference.segloss_stats(x, x, **{name: value}),
             lambda: fsl.keras.SegLoss(**{name: value})]
    if not isinstance(value, str) and not (name == "focal_alpha" and value < 0):
        calls.append(lambda: core.stats(x, x, **{name: value}))  # the kernels check too
    for call in calls:
        with pytest.raises(ValueError, match=name):
            call()


def test_segloss_config_round_trip_keeps_focal_and_metrics_use_it(rng):
    import keras

    loss = fsl.keras.SegLoss(dice_weight=0.5, focal_gamma=2.0, focal_alpha=0.25)
    config = loss.get_config()
    assert config["focal_gamma"] == 2.0 and config["focal_alpha"] == 0.25
    again = fsl.keras.SegLoss.from_config(config)
    copy = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(loss))
    logits = rng.normal(0.0, 2.0, (2, 5, 5, 3)).astype(np.float32)
    labels = (rng.random(logits.shape) < 0.4).astype(np.float32)
    value = float(loss(labels, logits))
    assert value == float(again(labels, logits)) == float(copy(labels, logits))
    assert value != float(fsl.keras.SegLoss(dice_weight=0.5)(labels, logits))
    metrics = fsl.keras.SegMetrics(num_classes=3, loss=loss, quantities=("ce",))
    metrics.update_state(tf.constant(labels), tf.constant(logits))  # its own pass
    assert not metrics.last_update_reused_loss_stats
    ce, _, _ = metrics.per_class()
    want = fsl.seg_loss_result(logits, labels, focal_gamma=2.0, focal_alpha=0.25).ce_per_class
    np.testing.assert_array_equal(ce.numpy(), want.numpy())


# MONAI's FocalLoss test (tests/losses/test_focal_loss.py, Project-MONAI/MONAI): sigmoid,
# gamma 2, input (1, 3, 2, 2) channels_first, target ids [[0, 1], [2, 0]] one-hot (written
# out below), reduction "mean" over every element. Every class has 4 elements, so our
# class mean of per-class means is that element mean; include_background=False is class
# weights [0, 1, 1]. Its reduction="none" values give each class's mean (ce_per_class).
# rtol 1e-4: MONAI prints 5 digits and compares with atol = rtol = 1e-4.
_MONAI_X = [[[[1.0, 1.0], [0.5, 0.0]], [[1.0, 1.0], [0.5, 0.0]], [[1.0, 1.0], [0.5, 0.0]]]]
_MONAI_Z = [[[[1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [0.0, 0.0]], [[0.0, 0.0], [1.0, 0.0]]]]
_MONAI_PER_CLASS = np.mean([[0.02266, 0.70187, 0.37741, 0.17329],
                            [0.70187, 0.02266, 0.37741, 0.17329],
                            [0.70187, 0.70187, 0.06757, 0.17329]], axis=1)


@pytest.mark.parametrize("implementation", ("fused", "reference"))
@pytest.mark.parametrize("options,expected", [
    (dict(), 0.34959),
    (dict(class_weights=[0.0, 1.0, 1.0]), 0.36498),
    (dict(focal_alpha=0.8), 0.08423),
])
def test_monai_published_focal_values(options, expected, implementation):
    result = fsl.seg_loss_result(np.array(_MONAI_X, np.float32), np.array(_MONAI_Z, np.float32),
                                 data_format="channels_first", focal_gamma=2.0, dice_weight=0.0,
                                 implementation=implementation, **options)
    assert float(result.total) == pytest.approx(expected, rel=1e-4, abs=1e-5)
    if not options:
        np.testing.assert_allclose(result.ce_per_class, _MONAI_PER_CLASS, rtol=1e-4)
