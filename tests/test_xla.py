"""The XLA path: the fused kernels as typed-FFI custom calls inside
tf.function(jit_compile=True) and Keras' XLA-compiled train step.

Oracles: the non-XLA fused path (the same C++ core, so the statistics must be bitwise
equal), the pure-TF reference, and the float64 NumPy implementation of the spec.
"""
import re
import warnings

import numpy as np
import pytest
import tensorflow as tf

import fused_segloss as fsl
import numpy_reference as npref
from fused_segloss import _inputs, _xla
from conftest import make_problem

pytestmark = pytest.mark.skipif(not fsl.fused_available(), reason="op library not built")

# Element-wise ops the reference's CE / Dice terms lower to; none may remain when the
# custom call does the work.
ELEMENTWISE_CE_DICE = re.compile(r"\b(logistic|exponential|exponential-minus-one|log|"
                                 r"log-plus-one)\(")

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


@pytest.fixture(autouse=True)
def _restore_availability():
    """Tests that force or re-decide availability leave the process's decision behind."""
    saved = (_xla._available, _xla._reason)
    yield
    _xla._available, _xla._reason = saved


@pytest.fixture
def custom_calls(monkeypatch):
    """Records the targets of the custom calls emitted while tracing (after the
    availability self-check, whose own custom calls are not recorded)."""
    assert _xla.available(), _xla.unavailable_reason()
    emitted = []
    real_call = _xla._call

    def recording_call(target, *args, **kwargs):
        emitted.append(target)
        return real_call(target, *args, **kwargs)

    monkeypatch.setattr(_xla, "_call", recording_call)
    return emitted


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


def _loss_and_grad(implementation="auto", **options):
    def loss_and_grad(logits, labels):
        with tf.GradientTape() as tape:
            tape.watch(logits)
            loss = fsl.seg_loss(logits, labels, implementation=implementation, **options)
        return loss, tape.gradient(loss, logits)
    return loss_and_grad


def _small_inputs(rng, shape=(2, 6, 5, 3), labels_dtype=np.float32):
    logits = tf.constant(rng.normal(0.0, 2.0, shape).astype(np.float32))
    labels = tf.constant((rng.random(shape) < 0.4).astype(labels_dtype))
    return logits, labels


def _hlo(jit_fn, *args):
    return jit_fn.experimental_get_compiler_ir(*args)(stage="hlo")


def test_compiled_hlo_is_the_custom_call_not_elementwise_math(rng):
    logits, labels = _small_inputs(rng)
    fused = tf.function(_loss_and_grad(), jit_compile=True)
    hlo = _hlo(fused, logits, labels)
    assert 'custom_call_target="fused_segloss_stats"' in hlo
    assert 'custom_call_target="fused_segloss_stats_grad"' in hlo
    assert "API_VERSION_TYPED_FFI" in hlo
    assert not ELEMENTWISE_CE_DICE.findall(hlo), ELEMENTWISE_CE_DICE.findall(hlo)
    # The same check on the jit-compiled reference finds the element-wise math, so the
    # pattern above would notice it.
    reference = tf.function(_loss_and_grad("reference"), jit_compile=True)
    assert {"logistic", "exponential"} <= set(ELEMENTWISE_CE_DICE.findall(_hlo(reference, logits,
                                                                               labels)))


def test_zero_size_batch_and_spatial_under_one_trace(rng):
    spec = tf.TensorSpec([None, None, 3], tf.float32)
    step = tf.function(_loss_and_grad(), jit_compile=True, input_signature=[spec, spec])
    eager = _loss_and_grad("fused")
    for shape in [(0, 4, 3), (2, 0, 3), (2, 4, 3)]:
        logits, labels = _small_inputs(rng, shape)
        (loss, grad), (want_loss, want_grad) = step(logits, labels), eager(logits, labels)
        assert np.isfinite(loss.numpy()) and grad.shape == shape
        np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
        np.testing.assert_allclose(grad, want_grad, rtol=1e-6, atol=1e-12)
    assert step.experimental_get_tracing_count() == 1


@pytest.mark.parametrize("bad, match", [("labels", "`labels` must lie in"),
                                        ("weights", "`weights` must be finite and >= 0")])
def test_handler_errors_are_invalid_argument_errors_under_xla(rng, bad, match):
    logits, labels = _small_inputs(rng)
    weights = tf.ones([2, 6, 5, 1])
    if bad == "labels":
        labels = tf.tensor_scatter_nd_update(labels, [[1, 2, 3, 0]], [2.0])
    else:
        weights = tf.tensor_scatter_nd_update(weights, [[0, 1, 1, 0]], [-1.0])

    @tf.function(jit_compile=True)
    def stats(logits, labels, weights):
        return fsl.segloss_stats(logits, labels, weights)

    assert 'custom_call_target="fused_segloss_stats"' in _hlo(stats, logits, labels, weights)
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
    logits, labels = _small_inputs(rng)
    loss_fn = tf.function(lambda x, z: fsl.seg_loss(x, z), jit_compile=True)
    with tf.GradientTape() as tape:
        tape.watch(logits)
        loss = loss_fn(logits, labels)
    grad = tape.gradient(loss, logits)
    want_loss, want_grad = _loss_and_grad("fused")(logits, labels)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-6, atol=1e-12)
    # (TF may trace the forward twice: once plain, once paired with its backward.)
    assert set(custom_calls) == {_xla.STATS_TARGET, _xla.GRAD_TARGET}


def test_jit_function_inside_a_plain_tf_function(rng, custom_calls):
    logits, labels = _small_inputs(rng, labels_dtype=bool)
    inner = tf.function(_loss_and_grad(), jit_compile=True)

    @tf.function
    def outer(logits, labels):
        loss, grad = inner(logits, labels)
        return loss * 2.0, grad, fsl.segloss_stats(logits, labels)  # the last: the TF op

    loss, grad, stats = outer(logits, labels)
    want_loss, want_grad = _loss_and_grad("fused")(logits, labels)
    np.testing.assert_allclose(loss, 2.0 * want_loss.numpy(), rtol=1e-6)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-6, atol=1e-12)
    np.testing.assert_array_equal(stats, fsl.segloss_stats(logits, labels))
    assert custom_calls == [_xla.STATS_TARGET, _xla.GRAD_TARGET]


def test_module_lists_both_platforms_when_built_with_cuda(rng, monkeypatch):
    """A CUDA build lists CPU and CUDA, and XlaCallModule then passes a platform index
    first: that module must still compile and run (here on the CPU)."""
    monkeypatch.setattr(_xla, "platforms", lambda: ("CPU", "CUDA"))
    logits, labels = _small_inputs(rng)
    loss, grad = tf.function(_loss_and_grad(), jit_compile=True)(logits, labels)
    want_loss, want_grad = _loss_and_grad("fused")(logits, labels)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-6, atol=1e-12)


def test_modules_are_cached_per_signature(rng):
    assert _xla.available()  # its self-check builds modules of its own
    _xla._module.cache_clear()
    logits, labels = _small_inputs(rng)
    for shape in [(2, 6, 5, 3), (1, 3, 3, 3)]:  # two jit functions, same dtypes and rank
        tf.function(_loss_and_grad(), jit_compile=True)(*_small_inputs(rng, shape))
    assert _xla._module.cache_info().currsize == 2  # the stats and the gradient module


# ----------------------------------------------------------------------------------------
# Softmax mode: sparse class ids (rank − 1 labels) and the softmax attributes


def _softmax_inputs(rng, shape=(3, 6, 5, 4), ignore_index=255):
    logits = rng.normal(0.0, 2.0, shape).astype(np.float32)
    ids = rng.integers(0, shape[-1], shape[:-1])
    ids[rng.random(ids.shape) < 0.2] = ignore_index
    return tf.constant(logits), tf.constant(ids.astype(np.uint8))


SOFTMAX_OPTIONS = dict(activation="softmax", ignore_index=255, focal_gamma=2.0,
                       include_background=False)


def test_softmax_sparse_labels_run_as_the_custom_call_with_dynamic_shapes(rng, custom_calls):
    specs = [tf.TensorSpec([None, None, None, 4], tf.float32),
             tf.TensorSpec([None, None, None], tf.uint8)]
    step = tf.function(_loss_and_grad(**SOFTMAX_OPTIONS), jit_compile=True,
                       input_signature=specs)
    eager = _loss_and_grad("fused", **SOFTMAX_OPTIONS)
    for shape in [(3, 6, 5, 4), (1, 2, 7, 4)]:
        logits, ids = _softmax_inputs(rng, shape)
        (loss, grad), (want_loss, want_grad) = step(logits, ids), eager(logits, ids)
        # The same kernels; only combine's float32 ops may be reordered by XLA.
        np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
        np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-9)
    assert step.experimental_get_tracing_count() == 1
    assert set(custom_calls) == {_xla.STATS_TARGET, _xla.GRAD_TARGET}


def test_softmax_hlo_has_no_elementwise_softmax(rng):
    logits, ids = _softmax_inputs(rng)
    hlo = _hlo(tf.function(_loss_and_grad(**SOFTMAX_OPTIONS), jit_compile=True), logits, ids)
    assert 'custom_call_target="fused_segloss_stats"' in hlo
    assert not ELEMENTWISE_CE_DICE.findall(hlo), ELEMENTWISE_CE_DICE.findall(hlo)


def test_softmax_and_sigmoid_modules_are_cached_apart(rng):
    assert _xla.available()
    _xla._module.cache_clear()
    logits, labels = _small_inputs(rng, (2, 6, 5, 3))
    tf.function(_loss_and_grad(), jit_compile=True)(logits, labels)
    tf.function(_loss_and_grad(activation="softmax"), jit_compile=True)(logits, labels)
    assert _xla._module.cache_info().currsize == 4  # stats and gradient, per activation


def test_softmax_class_id_errors_are_invalid_argument_errors_under_xla(rng):
    logits, ids = _softmax_inputs(rng)
    bad = tf.where(ids == 1, tf.constant(7, tf.uint8), ids)
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"`labels` class ids must lie in \[0, C\) = \[0, 4\)"):
        tf.function(_loss_and_grad(**SOFTMAX_OPTIONS), jit_compile=True)(logits, bad)


# ----------------------------------------------------------------------------------------
# Fallback: never an error for the user


def test_jit_falls_back_to_the_reference_when_unavailable(rng, monkeypatch, custom_calls):
    monkeypatch.setattr(_xla, "available", lambda: False)
    logits, labels = _small_inputs(rng)
    step = tf.function(_loss_and_grad(), jit_compile=True)
    loss, grad = step(logits, labels)
    assert custom_calls == []
    assert "custom-call" not in _hlo(step, logits, labels)
    want_loss, want_grad = _loss_and_grad("reference")(logits, labels)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("failure", ["import", "self_check", "no_ffi_handlers"])
def test_unavailable_private_api_warns_once_and_uses_the_reference(rng, monkeypatch, failure):
    if failure == "import":
        monkeypatch.setattr(_xla, "_IMPORT_ERROR", "ImportError: no module named ...")
    elif failure == "no_ffi_handlers":  # a library built against a TF without xla/ffi headers
        from fused_segloss import _loader

        monkeypatch.setattr(_loader.status(), "build_info",
                            dict(_loader.status().build_info, xla_ffi="OFF"))
    else:
        def broken_self_check():
            raise AttributeError("changed private API")
        monkeypatch.setattr(_xla, "_self_check", broken_self_check)
    _xla._reset_for_tests(None)
    logits, labels = _small_inputs(rng)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _xla.available() is False
        assert _xla.available() is False
        step = tf.function(_loss_and_grad(), jit_compile=True)
        loss, _ = step(logits, labels)
    xla_warnings = [w for w in caught if issubclass(w.category, _xla.FusedSeglossXlaWarning)]
    assert len(xla_warnings) == 1, [str(w.message) for w in caught]
    assert "reference" in str(xla_warnings[0].message)
    assert "custom-call" not in _hlo(step, logits, labels)
    np.testing.assert_allclose(loss, _loss_and_grad("reference")(logits, labels)[0], rtol=1e-6)


def test_self_check_passes_on_this_tensorflow():
    _xla._reset_for_tests(None)
    assert _xla._self_check() == ""
    assert _xla.available(), _xla.unavailable_reason()


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
