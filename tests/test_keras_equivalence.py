"""The CE term against TF's and Keras' own losses, and channels_first against the
channels_last transpose ("with no weights this equals
keras.losses.BinaryCrossentropy(from_logits=True) ... to float32 rounding")."""
import keras
import numpy as np
import pytest
import tensorflow as tf

import fused_segloss as fsl

IMPLEMENTATIONS = ("fused", "reference")
# Our CE sums in float32 lanes / float64 partials, TF's reduce_mean in float32 (tree
# reduction); both are a few float32 ulps from the exact mean. Over 1e4-1e5 elements
# 1e-5 relative leaves room for TF's float32 sum and still fails on any wrong term.
RTOL = 1e-5

CASES = [  # (logits shape, data_format, labels dtype, soft labels, extreme logits)
    ((4, 16, 16, 3), "channels_last", "float32", True, False),
    ((2, 1023, 1), "channels_last", "uint8", False, True),
    ((3, 5), "channels_last", "bool", False, False),
    ((2, 3, 7, 9, 5), "channels_last", "float32", False, False),
    ((2, 4, 33, 17), "channels_first", "float32", True, True),
    ((3, 100, 7), "channels_first", "bool", False, False),
]


def _inputs(rng, shape, labels_dtype, soft, extreme):
    x = rng.normal(0.0, 3.0, shape).astype(np.float32)
    if extreme:
        x[rng.random(shape) < 0.2] = 1e4
        x[rng.random(shape) < 0.2] = -1e4
    z = rng.random(shape) if soft else (rng.random(shape) < 0.3)
    return x, z.astype(labels_dtype)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("shape,data_format,labels_dtype,soft,extreme", CASES,
                         ids=lambda v: str(v).replace(" ", ""))
def test_ce_only_equals_keras_and_tf(shape, data_format, labels_dtype, soft, extreme,
                                     implementation, rng):
    x, z = _inputs(rng, shape, labels_dtype, soft, extreme)
    loss = fsl.seg_loss(x, z, data_format=data_format, dice_weight=0.0,
                        implementation=implementation)
    z_float = z.astype(np.float32)
    keras_bce = keras.losses.BinaryCrossentropy(from_logits=True)(z_float, x)
    tf_mean = tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(labels=z_float, logits=x))
    assert loss.dtype == tf.float32 and loss.shape == ()
    assert float(loss) == pytest.approx(float(tf_mean), rel=RTOL)
    assert float(loss) == pytest.approx(float(keras_bce), rel=RTOL)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
def test_ignored_pixels_do_not_dilute_the_mean(data_format, implementation, rng):
    """A per-pixel 0/1 mask: the CE is the plain mean over the kept pixels and classes."""
    shape = (2, 9, 11, 4) if data_format == "channels_last" else (2, 4, 9, 11)
    mask_shape = (2, 9, 11, 1) if data_format == "channels_last" else (2, 1, 9, 11)
    x, z = _inputs(rng, shape, "float32", True, False)
    mask = (rng.random(mask_shape) < 0.6).astype(np.float32)
    loss = fsl.seg_loss(x, z, mask, data_format=data_format, dice_weight=0.0,
                        implementation=implementation)
    per_element = tf.nn.sigmoid_cross_entropy_with_logits(labels=z, logits=x)
    kept = np.broadcast_to(mask, shape)
    expected = tf.reduce_sum(per_element * kept) / kept.sum()
    assert float(loss) == pytest.approx(float(expected), rel=RTOL)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_float16_logits_match_keras_on_the_same_values(implementation, rng):
    x, z = _inputs(rng, (2, 31, 31, 3), "float32", True, False)
    x16 = x.astype(np.float16)
    loss = fsl.seg_loss(x16, z, dice_weight=0.0, implementation=implementation)
    keras_bce = keras.losses.BinaryCrossentropy(from_logits=True)(z, x16.astype(np.float32))
    assert float(loss) == pytest.approx(float(keras_bce), rel=RTOL)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("with_weights", [False, True], ids=["plain", "weights-pos_weight"])
def test_channels_first_1d_equals_channels_last_transpose(with_weights, implementation, rng):
    """[b, n, l] channels_first (n classes, length l) is [b, l, n] channels_last."""
    b, n, length = 3, 5, 1023
    x_first = rng.normal(0.0, 3.0, (b, n, length)).astype(np.float32)
    z_first = (rng.random((b, n, length)) < 0.3).astype(np.float32)
    w_first = pw = w_last = None
    if with_weights:
        w_first = rng.uniform(0.0, 2.0, (b, 1, length)).astype(np.float32)
        w_last = np.transpose(w_first, (0, 2, 1))
        pw = rng.uniform(0.5, 3.0, n).astype(np.float32)
    x_last, z_last = (np.transpose(a, (0, 2, 1)) for a in (x_first, z_first))

    def run(x, z, w, data_format):
        x = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(x)
            stats = fsl.segloss_stats(x, z, w, pw, data_format=data_format,
                                      implementation=implementation)
            result = fsl.combine(stats, dice_mode="per_image")
        return stats.numpy(), result, tape.gradient(result.total, x).numpy()

    stats_f, result_f, grad_f = run(x_first, z_first, w_first, "channels_first")
    stats_l, result_l, grad_l = run(x_last, z_last, w_last, "channels_last")
    # Same elements, different summation order: float32 rounding only.
    np.testing.assert_allclose(stats_f, stats_l, rtol=2e-6)
    for name in result_f._fields:
        np.testing.assert_allclose(getattr(result_f, name).numpy(),
                                   getattr(result_l, name).numpy(), rtol=1e-5, err_msg=name)
    np.testing.assert_allclose(grad_f, np.transpose(grad_l, (0, 2, 1)), rtol=1e-5,
                               atol=1e-7 * np.abs(grad_l).max())
