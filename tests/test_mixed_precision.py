"""SegLoss under Keras mixed precision: half-precision logits in, float32 loss out, no full cast."""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

import fused_segloss as fsl  # noqa: E402

HALF_DTYPES = [tf.float16, tf.bfloat16]


@pytest.fixture
def restore_policy():
    previous = keras.mixed_precision.global_policy()
    yield
    keras.mixed_precision.set_global_policy(previous)


def _batch(shape=(4, 12, 10, 3), seed=0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=3.0, size=shape).astype(np.float32)
    labels = (rng.random(shape) < 0.3).astype(np.float32)
    return logits, labels


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_half_logits_give_the_float32_loss_of_the_same_values(dtype):
    logits, labels = _batch()
    half = tf.cast(logits, dtype)
    loss = fsl.keras.SegLoss(class_weights=[1, 2, 3])
    value = loss(labels, half)
    assert value.dtype == tf.float32
    # The op accumulates in float32 from the half values, so the loss equals the float32
    # loss of exactly those (rounded) values, up to float32 summation order.
    same_values = fsl.seg_loss(tf.cast(half, tf.float32), labels, class_weights=[1, 2, 3])
    np.testing.assert_allclose(value.numpy(), same_values.numpy(), rtol=1e-6)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_gradient_comes_back_in_the_logits_dtype(dtype):
    logits, labels = _batch(seed=1)
    half = tf.Variable(tf.cast(logits, dtype))
    with tf.GradientTape() as tape:
        value = fsl.keras.SegLoss()(labels, half)
    grad = tape.gradient(value, half)
    assert grad.dtype == dtype
    widened = tf.Variable(tf.cast(half, tf.float32))
    with tf.GradientTape() as tape:
        reference = fsl.seg_loss(widened, labels, implementation="reference")
    expected = tape.gradient(reference, widened).numpy()
    # Only the final rounding of each gradient element to the half type differs: half an
    # ulp, 2^-11 (float16) or 2^-8 (bfloat16) relative.
    rtol = 2.0 ** -10 if dtype == tf.float16 else 2.0 ** -7
    np.testing.assert_allclose(tf.cast(grad, tf.float32).numpy(), expected,
                               rtol=rtol, atol=float(np.abs(expected).max()) * 1e-3)


@pytest.mark.skipif(not fsl.fused_available(), reason="the fused op library is not built")
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_the_op_receives_the_half_logits_without_a_full_size_cast(dtype):
    logits, labels = _batch(seed=2)
    loss = fsl.keras.SegLoss()

    @tf.function
    def traced(x, z):
        return loss(z, x)

    graph = traced.get_concrete_function(tf.TensorSpec(logits.shape, dtype),
                                         tf.TensorSpec(labels.shape, tf.float32)).graph
    ops = graph.get_operations()
    fused = [op for op in ops if op.type == "FusedSeglossStats"]
    assert len(fused) == 1 and fused[0].inputs[0].dtype == dtype
    full_size_casts = [op for op in ops if op.type == "Cast" and op.inputs[0].dtype == dtype
                       and op.outputs[0].shape.num_elements() == logits.size]
    assert not full_size_casts


def _train(policy, steps_data):
    keras.mixed_precision.set_global_policy(policy)
    keras.utils.set_random_seed(1)
    images, labels = steps_data
    inputs = keras.Input(images.shape[1:])
    hidden = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(inputs)
    model = keras.Model(inputs, keras.layers.Conv2D(labels.shape[-1], 1)(hidden))
    loss = fsl.keras.SegLoss(pos_weight=[1.0, 2.0, 8.0])
    model.compile(keras.optimizers.Adam(1e-2), loss=loss,
                  metrics=[fsl.keras.SegMetrics(["a", "b", "c"], loss=loss)])
    history = model.fit(images, labels, batch_size=4, epochs=4, shuffle=False, verbose=0)
    return model, history.history


@pytest.mark.parametrize("policy, rtol", [
    # Measured deviations of the per-epoch loss from float32 are ~1e-5 (float16) and ~5e-5
    # (bfloat16); the tolerances keep a margin for other CPUs' conv kernels and are still
    # 20x below the loss' change per epoch (~2%), so a run that does not train (or trains
    # with a wrongly scaled gradient) fails.
    ("mixed_float16", 1e-3),
    ("mixed_bfloat16", 1e-3),
])
def test_training_under_a_mixed_policy_matches_float32(policy, rtol, restore_policy):
    rng = np.random.default_rng(3)
    data = (rng.normal(size=(8, 16, 16, 2)).astype(np.float32),
            (rng.random((8, 16, 16, 3)) < [0.4, 0.1, 0.02]).astype(np.float32))
    _, baseline = _train("float32", data)
    model, mixed = _train(policy, data)
    assert model.output.dtype == ("float16" if policy == "mixed_float16" else "bfloat16")
    if policy == "mixed_float16":
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    for key in ("loss", "iou/a", "dice/c", "ce/b"):
        assert np.all(np.isfinite(mixed[key])), key
    assert baseline["loss"][-1] < baseline["loss"][0] * 0.99  # it trains
    np.testing.assert_allclose(mixed["loss"], baseline["loss"], rtol=rtol)
    np.testing.assert_allclose(mixed["dice/c"], baseline["dice/c"], rtol=10 * rtol)
