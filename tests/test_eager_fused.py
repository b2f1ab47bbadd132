"""seg_loss_result called eagerly runs the fused op and `combine` as one traced function
(fused_segloss/_eager_fused.py). It must give exactly what the op-by-op path gives
(`combine(segloss_stats(...))`, which stays the path for tensor-valued options), values and
gradients, for every option that changes the traced function."""
import numpy as np
import pytest
import tensorflow as tf

import fused_segloss as fsl
from fused_segloss import _eager_fused

FIELDS = fsl.SegLossResult._fields


def _problem(seed, channels_last=True):
    rng = np.random.default_rng(seed)
    shape = (3, 9, 11, 4) if channels_last else (3, 4, 9, 11)
    logits = tf.constant(rng.normal(0.0, 2.0, shape).astype(np.float32))
    labels = tf.constant((rng.random(shape) < 0.3).astype(np.float32))
    wshape = (3, 9, 11, 1) if channels_last else (3, 1, 9, 11)
    weights = tf.constant(rng.random(wshape).astype(np.float32))
    return logits, labels, weights


# The losses a caller may differentiate: the total alone (its recorded backward is
# d total / d stats from the forward call), other result fields alone (the traced
# vector-Jacobian product of `combine`), and both (the tape adds the two before the stats'
# backward, the fused gradient op, runs).
LOSSES = {
    "total": lambda res: res.total,
    "fields": lambda res: 0.5 * tf.reduce_sum(res.dice_per_class) + res.ce,
    "total+fields": lambda res: res.total + 0.5 * tf.reduce_sum(res.dice_per_class) + res.ce,
}


def _with_gradients(fn, logits, *extra, loss="total+fields", upstream=None):
    with tf.GradientTape() as tape:
        tape.watch([logits, *extra])
        res = fn()
        value = LOSSES[loss](res)
    return res, tape.gradient(value, [logits, *extra], output_gradients=upstream)


OPTION_SETS = [
    {},
    {"data_format": "channels_first"},
    {"squared": True, "dice_mode": "per_image", "empty": "exclude"},
    {"ce_weight": 0.3, "dice_weight": 2.0, "smooth": 1.0, "pos_weight": [1.0, 2.0, 0.5, 3.0]},
    {"weights": True, "class_weights": [1.0, 0.0, 2.0, 1.0]},
]


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("options", OPTION_SETS, ids=lambda o: ",".join(o) or "defaults")
def test_eager_fast_path_equals_op_by_op(options, loss):
    options = dict(options)
    channels_last = options.get("data_format", "channels_last") == "channels_last"
    logits, labels, weights = _problem(1, channels_last)
    weights = weights if options.pop("weights", False) else None
    pos_weight = options.pop("pos_weight", None)
    assert _eager_fused.applicable(options)
    stats_opts = {k: v for k, v in options.items() if k in fsl._STATS_OPTIONS}
    combine_opts = {k: v for k, v in options.items() if k in fsl._COMBINE_OPTIONS}

    fast, fast_grad = _with_gradients(
        lambda: fsl.seg_loss_result(logits, labels, weights, pos_weight, **options), logits,
        loss=loss)
    slow, slow_grad = _with_gradients(
        lambda: fsl.combine(fsl.segloss_stats(logits, labels, weights, pos_weight,
                                              **stats_opts), **combine_opts), logits, loss=loss)
    assert np.abs(slow_grad[0].numpy()).max() > 0
    for field in FIELDS:
        np.testing.assert_allclose(getattr(fast, field).numpy(), getattr(slow, field).numpy(),
                                   rtol=1e-6, atol=1e-7, err_msg=field)
    np.testing.assert_allclose(fast_grad[0].numpy(), slow_grad[0].numpy(), rtol=1e-5,
                               atol=1e-10)


@pytest.mark.parametrize("loss", LOSSES)
def test_class_weight_tensor_still_gets_its_gradient(loss):
    logits, labels, _ = _problem(2)
    cw = tf.constant([1.0, 2.0, 0.5, 1.0])
    _, (fast_logits, fast) = _with_gradients(
        lambda: fsl.seg_loss_result(logits, labels, class_weights=cw), logits, cw, loss=loss)
    _, (ref_logits, ref) = _with_gradients(
        lambda: fsl.seg_loss_result(logits, labels, class_weights=cw,
                                    implementation="reference"), logits, cw, loss=loss)
    assert fast is not None
    np.testing.assert_allclose(fast.numpy(), ref.numpy(), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(fast_logits.numpy(), ref_logits.numpy(), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("scale", [1.0, 2.5, 0.0])
def test_upstream_gradient_of_the_total_scales_the_logit_gradient(scale):
    """The total-only backward multiplies the forward's Jacobian by the upstream gradient
    (1 skips the multiply; Keras' loss scaling and reductions pass other values)."""
    logits, labels, weights = _problem(6)
    _, (got, *_) = _with_gradients(lambda: fsl.seg_loss_result(logits, labels, weights),
                                   logits, loss="total", upstream=tf.constant(scale))
    _, (want, *_) = _with_gradients(
        lambda: fsl.seg_loss_result(logits, labels, weights, implementation="reference"),
        logits, loss="total")
    np.testing.assert_allclose(got.numpy(), scale * want.numpy(), rtol=1e-4, atol=1e-9)


def test_a_tape_not_watching_the_inputs_records_nothing():
    logits, labels, _ = _problem(7)
    other = tf.constant(1.0)
    with tf.GradientTape() as tape:
        tape.watch(other)
        loss = fsl.seg_loss(logits, labels) * other
    d_logits, d_other = tape.gradient(loss, [logits, other])
    assert d_logits is None
    np.testing.assert_allclose(d_other.numpy(), loss.numpy(), rtol=1e-6)


def test_tensor_options_take_the_op_by_op_path_and_agree():
    logits, labels, _ = _problem(3)
    weight = tf.constant(0.25)
    assert not _eager_fused.applicable({"ce_weight": weight})
    with tf.GradientTape() as tape:
        tape.watch(weight)
        got = fsl.seg_loss(logits, labels, ce_weight=weight)
    d_weight = tape.gradient(got, weight)
    want = fsl.seg_loss(logits, labels, ce_weight=0.25)
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-6)
    ce = fsl.seg_loss_result(logits, labels).ce
    np.testing.assert_allclose(d_weight.numpy(), ce.numpy(), rtol=1e-5)


def test_not_used_inside_a_graph_or_with_check_numerics():
    assert not _eager_fused.applicable({"check_numerics": True})
    seen = []

    @tf.function
    def traced():
        seen.append(_eager_fused.applicable({}))
        return 0

    traced()
    assert seen == [False]


def test_traced_functions_stay_bounded():
    logits, labels, _ = _problem(4)
    for i in range(_eager_fused._MAX_FUNCTIONS + 5):
        fsl.seg_loss(logits, labels, smooth=1.0 + i)
    assert len(_eager_fused._functions) <= _eager_fused._MAX_FUNCTIONS


def test_bad_labels_still_raise_naming_the_argument():
    logits, labels, _ = _problem(5)
    with pytest.raises(tf.errors.InvalidArgumentError, match="`labels` must lie in"):
        fsl.seg_loss(logits, labels * 3.0)
    with pytest.raises(ValueError, match="`labels` shape"):
        fsl.seg_loss(logits, labels[..., :2])


class _CountingLibrary:
    """ops.library() with a count of the gradient op's calls (either gradient op: the one
    that reads the forward's label bytes, ops.py, is the eager path's under a tape)."""

    def __init__(self, library):
        self._library = library
        self.gradient_calls = 0

    def __getattr__(self, name):
        op = getattr(self._library, name)
        if name not in ("fused_segloss_stats_grad", "fused_segloss_stats_grad_with_label_bytes"):
            return op

        def counted(*args, **kwargs):
            self.gradient_calls += 1
            return op(*args, **kwargs)
        return counted


@pytest.mark.parametrize("loss", LOSSES)
def test_the_gradient_op_runs_once_whichever_results_are_differentiated(loss, monkeypatch):
    """total and the other fields are separate recorded operations on the stats; the tape
    must add their gradients before the one pass of the fused gradient op."""
    logits, labels, _ = _problem(8)
    counting = _CountingLibrary(_eager_fused.ops.library())
    monkeypatch.setattr(_eager_fused.ops, "library", lambda: counting)
    _, (got, *_) = _with_gradients(lambda: fsl.seg_loss_result(logits, labels), logits,
                                   loss=loss)
    monkeypatch.undo()
    assert counting.gradient_calls == 1
    _, (want, *_) = _with_gradients(
        lambda: fsl.seg_loss_result(logits, labels, implementation="reference"), logits,
        loss=loss)
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-4, atol=1e-9)


def test_a_persistent_tape_differentiates_total_and_a_field_in_turn():
    logits, labels, _ = _problem(9)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(logits)
        fast = fsl.seg_loss_result(logits, labels)
        ref = fsl.seg_loss_result(logits, labels, implementation="reference")
    for field in ("total", "ce", "dice_loss", "total"):
        got = tape.gradient(getattr(fast, field), logits)
        want = tape.gradient(getattr(ref, field), logits)
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-4, atol=1e-9,
                                   err_msg=field)
    iou_gradient = tape.gradient(fast.iou_per_class, logits)
    assert iou_gradient is None or not np.any(iou_gradient.numpy())


def test_direct_call_equals_the_concrete_function_and_falls_back():
    concrete = tf.function(lambda a, b: (a * b, a + b)).get_concrete_function(
        tf.TensorSpec([3], tf.float32), tf.TensorSpec([3], tf.float32))
    a, b = tf.constant([1.0, 2.0, 3.0]), tf.constant([0.5, -1.0, 4.0])
    direct = _eager_fused._direct_call(concrete)
    assert direct is not concrete
    for got, want in zip(direct(a, b), concrete(a, b)):
        np.testing.assert_array_equal(got.numpy(), want.numpy())

    class NoPrivateApi:  # what a TensorFlow without ConcreteFunction.inference_fn gives
        captured_inputs = ()

        def __call__(self, *args):
            return concrete(*args)

    fallback = NoPrivateApi()
    assert _eager_fused._direct_call(fallback) is fallback
