"""The XLA path: the fused kernels as typed-FFI custom calls inside
tf.function(jit_compile=True) and Keras' XLA-compiled train step.

Oracles: the non-XLA fused path (the same C++ core, so the statistics must be bitwise
equal), the pure-TF reference, and the float64 NumPy implementation of the spec. Softmax
mode inside XLA: test_xla_softmax.py; the reference inside XLA when the custom calls are not
available: test_xla_fallback.py.
"""
import numpy as np
import pytest
import tensorflow as tf

import fused_segloss as fsl
import numpy_reference as npref
from fused_segloss import _xla
from conftest import make_problem
from xla_helpers import ELEMENTWISE_CE_DICE, hlo_text, loss_and_grad_fn, small_inputs

pytestmark = pytest.mark.skipif(not fsl.fused_available(), reason="op library not built")

# (problem options, [(batch, spatial) per call]): every call of a case goes through ONE
# trace of a function whose input signature has None batch and spatial dimensions.
CASES = {
    "last-f32-pixelweights-posweight": (
        dict(data_format="channels_last", logits_dtype="float32", labels_dtype="float32",
             soft=True, weights="pixel", pos_weight=True),
        [(3, (5, 6)), (1, (2, 9)), (2, (4, 4))]),
    "first-f32-bool-fullweights-squared": (
        dict(data_format="channels_first", logits_dtype="float32", labels_dtype="bool",
             weights="full", squared=True),
        [(2, (4, 5)), (3, (1, 7))]),
    "last-bf16-uint8-posweight": (
        dict(data_format="channels_last", logits_dtype="bfloat16", labels_dtype="uint8",
             pos_weight=True),
        [(4, (33,)), (1, (5,))]),
    "first-f64-3d-imageweights": (
        dict(data_format="channels_first", logits_dtype="float64", labels_dtype="float64",
             soft=True, weights="image", pos_weight=True),
        [(2, (3, 4, 2)), (1, (2, 2, 5))]),
    "last-f16-nospatial-classweights": (
        dict(data_format="channels_last", logits_dtype="float16", labels_dtype="float16",
             weights="class"),
        [(5, ()), (2, ())]),
}


def _spec(arrays, dtype=None):
    """A TensorSpec: None where the arrays' sizes differ (batch, spatial), else the size."""
    shapes = [np.shape(a) for a in arrays]
    dims = [d[0] if len(set(d)) == 1 else None for d in zip(*shapes)]
    return tf.TensorSpec(dims, dtype or tf.as_dtype(np.asarray(arrays[0]).dtype))


def _all_none_spec(arrays):
    rank = np.ndim(arrays[0])
    return tf.TensorSpec([None] * rank, tf.as_dtype(np.asarray(arrays[0]).dtype))


def _evaluate(logits, labels, weights, pos_weight, upstream, options, implementation):
    """(stats, loss, dloss/dlogits, d<stats, upstream>/dlogits)."""
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(logits)
        stats = fsl.segloss_stats(logits, labels, weights, pos_weight, **options,
                                  implementation=implementation)
        loss = fsl.seg_loss(logits, labels, weights, pos_weight, **options,
                            implementation=implementation)
    return (stats, loss, tape.gradient(loss, logits),
            tape.gradient(stats, logits, output_gradients=upstream))


def _jit_step(options, has_weights, has_pos_weight, signature):
    """A jit-compiled _evaluate; absent weights / pos_weight travel as ignored dummies."""

    @tf.function(jit_compile=True, input_signature=signature)
    def step(logits, labels, upstream, weights, pos_weight):
        return _evaluate(logits, labels, weights if has_weights else None,
                         pos_weight if has_pos_weight else None, upstream, options, "auto")

    return step


def _case_problems(rng, options, calls):
    return [make_problem(rng, batch=b, spatial=s, **options) for b, s in calls]


def _naive_sigmoid_floor(prob, grad_stats, eps):
    """Per element, what TF autodiff's p * (1 - p) with p rounded may lose: eps times each
    gradient term's bound (|ce'| <= 1 + pos_weight, p(1-p) <= 1, 2 p p(1-p) <= 2)."""
    g = np.abs(grad_stats)
    pw = np.ones(g.shape[1]) if prob.pos_weight is None else prob.pos_weight.astype(np.float64)
    bound = g[..., 0] * (1.0 + pw) + g[..., 2] + 2.0 * g[..., 3]          # [B, C]
    rank = prob.logits.ndim
    if prob.data_format == "channels_last":
        bound = bound.reshape(bound.shape[0], *[1] * (rank - 2), bound.shape[1])
    else:
        bound = bound.reshape(*bound.shape, *[1] * (rank - 2))
    w = 1.0 if prob.weights is None else prob.weights.astype(np.float64)
    return eps * np.broadcast_to(w * bound, prob.logits.shape)


def _loss_magnitude(prob):
    """The size of the terms the total adds: ce + (1 - dice) with dice <= 1."""
    args, kwargs = prob.args()
    return npref.combine(npref.stats(*args, **kwargs)).ce + 1.0


@pytest.mark.parametrize("case", sorted(CASES))
def test_jit_matches_fused_reference_and_numpy(case, rng, check, custom_calls):
    options, calls = CASES[case]
    problems = _case_problems(rng, options, calls)
    dummy = np.zeros([0], np.float32)
    has_w, has_pw = problems[0].weights is not None, problems[0].pos_weight is not None
    upstreams = [rng.normal(0.0, 1.0, npref.stats(*p.args()[0], **p.args()[1]).shape)
                 .astype(np.float32) for p in problems]
    signature = [_all_none_spec([p.logits for p in problems]),
                 _all_none_spec([p.labels for p in problems]),
                 tf.TensorSpec([None, None, 8], tf.float32),
                 _spec([p.weights for p in problems]) if has_w else _spec([dummy]),
                 _spec([p.pos_weight for p in problems]) if has_pw else _spec([dummy])]
    stats_options = {"data_format": options["data_format"],
                     "squared": options.get("squared", False)}
    step = _jit_step(stats_options, has_w, has_pw, signature)
    dtype = check.dtype_name(problems[0].logits)

    for prob, upstream in zip(problems, upstreams):
        args, kwargs = prob.args()
        tensors = [tf.constant(a) if a is not None else None for a in args]
        jit = step(tensors[0], tensors[1], tf.constant(upstream),
                   tensors[2] if has_w else dummy, tensors[3] if has_pw else dummy)
        fused = _evaluate(*tensors, tf.constant(upstream), stats_options, "fused")
        reference = _evaluate(*tensors, tf.constant(upstream), stats_options, "reference")
        jit_stats, jit_loss, jit_loss_grad, jit_stats_grad = (t.numpy() for t in jit)

        # The same C++ core on the same inputs, deterministic for any thread count.
        np.testing.assert_array_equal(jit_stats, fused[0].numpy())
        np.testing.assert_array_equal(jit_stats_grad, fused[3].numpy())
        # ... and both right by the spec.
        np_stats = npref.stats(*args, **kwargs)
        check.stats(jit_stats, np_stats, dtype)
        check.stats(reference[0].numpy(), np_stats, dtype,
                    rtol=check.stats_rtol(prob, "reference"))
        check.grad(jit_stats_grad, npref.logit_grad(*args, grad_stats=upstream, **kwargs),
                   npref.logit_grad_scale(*args, grad_stats=upstream, **kwargs), dtype)

        # The loss: identical stats, then the same tiny float32 combine, compiled by XLA
        # here and run op by op there (XLA may fuse and reorder it): a few float32 ulp.
        magnitude = _loss_magnitude(prob)
        check.loss(jit_loss, float(fused[1]), magnitude, rtol=1e-6)
        # Against the reference and NumPy: the stats' own tolerance, tripled because the
        # Dice ratio carries the error of I once and of P + Z twice.
        loss_rtol = 3 * check.stats_rtol(prob, "reference") + 1e-6
        check.loss(jit_loss, float(reference[1]), magnitude, rtol=loss_rtol)
        check.loss(jit_loss, npref.combine(np_stats).total, magnitude, rtol=loss_rtol)

        # The loss gradient: the kernel's per-element error (check.grad's own tolerance)
        # plus that of the float32 upstream dloss/dstats (3x the stats' error, as above);
        # against the fused path only the combine's few-ulp reordering differs.
        loss_upstream = npref.combine_grad(np_stats)
        scale = npref.logit_grad_scale(*args, grad_stats=loss_upstream, **kwargs)
        check.grad(jit_loss_grad, np.asarray(fused[2].numpy(), np.float64), scale, dtype,
                   extra_rtol=1e-6, what="loss gradient (XLA vs fused op)")
        check.grad(jit_loss_grad, npref.logit_grad(*args, grad_stats=loss_upstream, **kwargs),
                   scale, dtype, extra_rtol=3 * check.stats_rtol(prob, "fused") + 8 * 2.0 ** -24,
                   what="loss gradient (XLA vs NumPy)")
        # The reference differs from NumPy by its naive sigmoid derivative (an absolute
        # eps per term) on top of the same upstream error.
        ref_floor = _naive_sigmoid_floor(prob, loss_upstream, check.COMPUTE_EPS[dtype])
        check.grad(reference[2].numpy(), np.asarray(jit_loss_grad, np.float64), scale, dtype,
                   extra_rtol=6 * check.stats_rtol(prob, "reference") + 16 * 2.0 ** -24,
                   floor=ref_floor, what="loss gradient (reference vs XLA)")

    assert step.experimental_get_tracing_count() == 1
    # Traced once: stats and loss forward, and both backward passes, as custom calls.
    assert sorted(set(custom_calls)) == [_xla.STATS_TARGET, _xla.GRAD_TARGET]


# ----------------------------------------------------------------------------------------
# What runs inside XLA


def test_compiled_hlo_is_the_custom_call_not_elementwise_math(rng):
    logits, labels = small_inputs(rng)
    fused = tf.function(loss_and_grad_fn(), jit_compile=True)
    hlo = hlo_text(fused, logits, labels)
    assert 'custom_call_target="fused_segloss_stats"' in hlo
    assert 'custom_call_target="fused_segloss_stats_grad"' in hlo
    assert "API_VERSION_TYPED_FFI" in hlo
    assert not ELEMENTWISE_CE_DICE.findall(hlo), ELEMENTWISE_CE_DICE.findall(hlo)
    # The same check on the jit-compiled reference finds the element-wise math, so the
    # pattern above would notice it.
    reference = tf.function(loss_and_grad_fn("reference"), jit_compile=True)
    reference_hlo = hlo_text(reference, logits, labels)
    assert {"logistic", "exponential"} <= set(ELEMENTWISE_CE_DICE.findall(reference_hlo))


def test_zero_size_batch_and_spatial_under_one_trace(rng):
    spec = tf.TensorSpec([None, None, 3], tf.float32)
    step = tf.function(loss_and_grad_fn(), jit_compile=True, input_signature=[spec, spec])
    eager = loss_and_grad_fn("fused")
    for shape in [(0, 4, 3), (2, 0, 3), (2, 4, 3)]:
        logits, labels = small_inputs(rng, shape)
        (loss, grad), (want_loss, want_grad) = step(logits, labels), eager(logits, labels)
        assert np.isfinite(loss.numpy()) and grad.shape == shape
        np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
        np.testing.assert_allclose(grad, want_grad, rtol=1e-6, atol=1e-12)
    assert step.experimental_get_tracing_count() == 1


@pytest.mark.parametrize("bad, match", [("labels", "`labels` must lie in"),
                                        ("weights", "`weights` must be finite and >= 0")])
def test_handler_errors_are_invalid_argument_errors_under_xla(rng, bad, match):
    logits, labels = small_inputs(rng)
    weights = tf.ones([2, 6, 5, 1])
    if bad == "labels":
        labels = tf.tensor_scatter_nd_update(labels, [[1, 2, 3, 0]], [2.0])
    else:
        weights = tf.tensor_scatter_nd_update(weights, [[0, 1, 1, 0]], [-1.0])

    @tf.function(jit_compile=True)
    def stats(logits, labels, weights):
        return fsl.segloss_stats(logits, labels, weights)

    assert 'custom_call_target="fused_segloss_stats"' in hlo_text(stats, logits, labels, weights)
    with pytest.raises(tf.errors.InvalidArgumentError, match=match):
        stats(logits, labels, weights).numpy()


@pytest.mark.parametrize("labels_shape, weights_shape, match", [
    ((2, 5, 3), (2, 4, 1), r"`labels` shape \[2, 5, 3\] must equal the `logits` shape"),
    ((2, 4, 3), (2, 3, 1), r"`weights` spatial size 3 does not broadcast"),
])
def test_shape_errors_known_only_at_run_time(labels_shape, weights_shape, match):
    """With None dimensions the Python checks cannot see these; the handler must."""
    spec = tf.TensorSpec([None, None, 3], tf.float32)

    @tf.function(jit_compile=True,
                 input_signature=[spec, spec, tf.TensorSpec([None, None, 1], tf.float32)])
    def stats(logits, labels, weights):
        return fsl.segloss_stats(logits, labels, weights)

    with pytest.raises(tf.errors.InvalidArgumentError, match=match):
        stats(tf.zeros([2, 4, 3]), tf.zeros(labels_shape), tf.ones(weights_shape)).numpy()


def test_tape_outside_the_jit_function(rng, custom_calls):
    """The backward of a jit function is compiled by XLA too, though it may be traced
    outside an XLA context: it must still use the custom call, never the TF op."""
    logits, labels = small_inputs(rng)
    loss_fn = tf.function(lambda x, z: fsl.seg_loss(x, z), jit_compile=True)
    with tf.GradientTape() as tape:
        tape.watch(logits)
        loss = loss_fn(logits, labels)
    grad = tape.gradient(loss, logits)
    want_loss, want_grad = loss_and_grad_fn("fused")(logits, labels)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-6, atol=1e-12)
    # (TF may trace the forward twice: once plain, once paired with its backward.)
    assert set(custom_calls) == {_xla.STATS_TARGET, _xla.GRAD_TARGET}


def test_jit_function_inside_a_plain_tf_function(rng, custom_calls):
    logits, labels = small_inputs(rng, labels_dtype=bool)
    inner = tf.function(loss_and_grad_fn(), jit_compile=True)

    @tf.function
    def outer(logits, labels):
        loss, grad = inner(logits, labels)
        return loss * 2.0, grad, fsl.segloss_stats(logits, labels)  # the last: the TF op

    loss, grad, stats = outer(logits, labels)
    want_loss, want_grad = loss_and_grad_fn("fused")(logits, labels)
    np.testing.assert_allclose(loss, 2.0 * want_loss.numpy(), rtol=1e-6)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-6, atol=1e-12)
    np.testing.assert_array_equal(stats, fsl.segloss_stats(logits, labels))
    assert custom_calls == [_xla.STATS_TARGET, _xla.GRAD_TARGET]


def test_module_lists_both_platforms_when_built_with_cuda(rng, monkeypatch):
    """A CUDA build lists CPU and CUDA, and XlaCallModule then passes a platform index
    first: that module must still compile and run (here on the CPU)."""
    monkeypatch.setattr(_xla, "platforms", lambda: ("CPU", "CUDA"))
    logits, labels = small_inputs(rng)
    loss, grad = tf.function(loss_and_grad_fn(), jit_compile=True)(logits, labels)
    want_loss, want_grad = loss_and_grad_fn("fused")(logits, labels)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-6, atol=1e-12)


def test_modules_are_cached_per_signature(rng):
    assert _xla.available()  # its self-check builds modules of its own
    _xla._module.cache_clear()
    logits, labels = small_inputs(rng)
    for shape in [(2, 6, 5, 3), (1, 3, 3, 3)]:  # two jit functions, same dtypes and rank
        tf.function(loss_and_grad_fn(), jit_compile=True)(*small_inputs(rng, shape))
    assert _xla._module.cache_info().currsize == 2  # the stats and the gradient module


# ----------------------------------------------------------------------------------------
# Keras: model.fit with an XLA-compiled train step


def _train_three_steps(implementation):
    import keras

    class SegLossForTest(keras.losses.Loss):
        """seg_loss as a Keras loss (y_pred are logits); fsl.keras.SegLoss is tested
        elsewhere, this keeps the XLA test independent of it."""

        def __init__(self):
            super().__init__(name="seg_loss_for_test")

        def call(self, y_true, y_pred):
            return fsl.seg_loss(y_pred, y_true, implementation=implementation)

    rng = np.random.default_rng(7)
    images = rng.normal(size=(8, 16, 16, 3)).astype(np.float32)
    masks = (rng.random((8, 16, 16, 2)) < 0.3).astype(np.float32)
    keras.utils.set_random_seed(1234)  # the same initial weights for both runs
    model = keras.Sequential([keras.Input((16, 16, 3)),
                              keras.layers.Conv2D(8, 3, padding="same", activation="relu"),
                              keras.layers.Conv2D(2, 1)])
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss=SegLossForTest(),
                  jit_compile=True)
    history = model.fit(images, masks, batch_size=8, epochs=3, shuffle=False, verbose=0)
    return np.array(history.history["loss"]), model.get_weights()


def test_keras_fit_with_jit_compile_matches_the_reference(custom_calls):
    fused_losses, fused_weights = _train_three_steps("auto")
    assert set(custom_calls) == {_xla.STATS_TARGET, _xla.GRAD_TARGET}
    del custom_calls[:]
    reference_losses, reference_weights = _train_three_steps("reference")
    assert custom_calls == []
    assert fused_losses.shape == (3,) and fused_losses[2] < fused_losses[0]  # it trains
    # The two losses differ by float32 rounding only: stats within ~2e-5 relative (see
    # conftest.STATS_RTOL), so each loss and gradient within ~1e-4 relative; three SGD
    # steps carry that into the weights without amplifying it (a small, smooth model).
    np.testing.assert_allclose(fused_losses, reference_losses, rtol=1e-4)
    for fused, reference in zip(fused_weights, reference_weights):
        np.testing.assert_allclose(fused, reference, rtol=1e-4, atol=1e-6)
