"""fsl.keras.SegMetrics and friends: values against float64 NumPy, reuse of the loss' stats, logs."""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

import fused_segloss as fsl  # noqa: E402
import numpy_reference as npref  # noqa: E402

NAMES = ["road", "car", "sign"]
B, H, W, C = 4, 6, 7, 3


def _fixed_batch(seed):
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=2.0, size=(B, H, W, C)).astype(np.float32)
    labels = (rng.random((B, H, W, C)) < [0.5, 0.2, 0.05]).astype(np.float32)
    return logits, labels


def _expected(batches, weights=None, pos_weight=None, smooth=1e-5):
    """{key: value} for the accumulated batches, computed in float64 NumPy."""
    totals = sum(npref.stats(x, z, None if weights is None else w, pos_weight).sum(axis=0)
                 for (x, z), w in zip(batches, weights or [None] * len(batches)))
    result = npref.combine(totals[None], smooth=smooth)
    ce, dice, iou = result.ce_per_class, result.dice_per_class, result.iou_per_class
    out = {}
    for q, values in (("dice", dice), ("iou", iou), ("ce", ce)):
        out.update({f"{q}/{n}": values[i] for i, n in enumerate(NAMES)})
    return out


def _check(result, expected):
    assert set(result) == set(expected)
    for key, value in expected.items():
        np.testing.assert_allclose(float(result[key]), value, rtol=2e-6, atol=1e-7, err_msg=key)


def test_values_accumulate_over_batches_like_numpy():
    batches = [_fixed_batch(0), _fixed_batch(1)]
    metric = fsl.keras.SegMetrics(NAMES)
    for logits, labels in batches:
        metric.update_state(labels, logits)
    _check(metric.result(), _expected(batches))
    metric.reset_state()
    np.testing.assert_array_equal(metric.totals.numpy(), np.zeros((C, 8)))


def test_sample_weight_and_pos_weight_follow_the_loss_mapping():
    batches = [_fixed_batch(2), _fixed_batch(3)]
    rng = np.random.default_rng(4)
    pixel_weights = [rng.random((B, H, W)).astype(np.float32) for _ in batches]
    metric = fsl.keras.SegMetrics(NAMES, pos_weight=[1.0, 4.0, 9.0])
    for (logits, labels), weight in zip(batches, pixel_weights):
        metric.update_state(labels, logits, sample_weight=weight)
    _check(metric.result(), _expected(batches, [w[..., None] for w in pixel_weights],
                                      pos_weight=[1.0, 4.0, 9.0]))


def test_metric_takes_the_loss_options():
    loss = fsl.keras.SegLoss(pos_weight=[2.0, 2.0, 2.0], smooth=1.0)
    metric = fsl.keras.SegMetrics(NAMES, loss=loss)
    logits, labels = _fixed_batch(5)
    metric.update_state(labels, logits)  # no loss call before: the metric's own pass
    assert not metric.last_update_reused_loss_stats
    _check(metric.result(), _expected([(logits, labels)], pos_weight=[2.0] * 3, smooth=1.0))


def test_reuses_the_loss_stats_only_for_the_same_tensors():
    loss = fsl.keras.SegLoss()
    metric = fsl.keras.SegMetrics(NAMES, loss=loss)
    logits, labels = (tf.constant(a) for a in _fixed_batch(6))
    weight = tf.constant(np.random.default_rng(6).random(B).astype(np.float32))
    loss(labels, logits, sample_weight=weight)
    metric.update_state(labels, logits, sample_weight=weight)
    assert metric.last_update_reused_loss_stats
    metric.update_state(labels, logits)  # other sample_weight: must not reuse
    assert not metric.last_update_reused_loss_stats
    metric.update_state(labels, tf.identity(logits), sample_weight=weight)  # another tensor
    assert not metric.last_update_reused_loss_stats
    weighted = npref.stats(logits.numpy(), labels.numpy(), weight.numpy()[:, None, None, None])
    expected_totals = 2 * weighted.sum(0) + npref.stats(logits.numpy(), labels.numpy()).sum(0)
    np.testing.assert_allclose(metric.totals.numpy(), expected_totals, rtol=2e-6, atol=1e-5)


@pytest.mark.parametrize("mode", ["eager", "graph", "xla"])
def test_fit_logs_per_class_values_of_the_whole_epoch(mode):
    """With a learning rate of 0 the predictions stay fixed, so the epoch's logged values
    must equal NumPy on all of the epoch's predictions at once."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((H, W, 2))
    model = keras.Model(inputs, keras.layers.Conv2D(C, 3, padding="same")(inputs))
    loss = fsl.keras.SegLoss()
    metric = fsl.keras.SegMetrics(NAMES, loss=loss)
    model.compile(keras.optimizers.SGD(0.0), loss=loss, weighted_metrics=[metric],
                  run_eagerly=mode == "eager", jit_compile=mode == "xla")
    rng = np.random.default_rng(7)
    images = rng.normal(size=(3 * B, H, W, 2)).astype(np.float32)
    labels = (rng.random((3 * B, H, W, C)) < [0.4, 0.1, 0.02]).astype(np.float32)
    weight = rng.random(3 * B).astype(np.float32)
    history = model.fit(images, labels, sample_weight=weight, batch_size=B, epochs=1,
                        shuffle=False, verbose=0, validation_data=(images[:B], labels[:B]))
    assert metric.last_update_reused_loss_stats  # weighted_metrics get the loss' sample_weight
    logits = model.predict(images, batch_size=B, verbose=0)
    expected = _expected([(logits, labels)], [weight[:, None, None, None]])
    _check({k: v[0] for k, v in history.history.items() if "/" in k and not k.startswith("val_")},
           expected)
    expected_val = _expected([(logits[:B], labels[:B])])
    _check({k[4:]: v[0] for k, v in history.history.items() if k.startswith("val_") and "/" in k},
           expected_val)


@pytest.mark.parametrize("cls, quantity", [(fsl.keras.PerClassDice, "dice"),
                                           (fsl.keras.PerClassIoU, "iou"),
                                           (fsl.keras.PerClassCE, "ce")])
def test_single_quantity_metrics(cls, quantity):
    logits, labels = _fixed_batch(8)
    metric = cls(NAMES)
    metric.update_state(labels, logits)
    expected = {k: v for k, v in _expected([(logits, labels)]).items() if k.startswith(quantity)}
    _check(metric.result(), expected)
    clone = cls.from_config(metric.get_config())
    assert clone.get_config() == metric.get_config()


def test_prefix_and_num_classes_name_the_keys():
    metric = fsl.keras.SegMetrics(num_classes=2, prefix="head_", quantities=["iou"])
    logits, labels = _fixed_batch(9)
    metric.update_state(labels[..., :2], logits[..., :2])
    assert sorted(metric.result()) == ["head_iou/0", "head_iou/1"]


def test_config_round_trip_with_loss():
    loss = fsl.keras.SegLoss(pos_weight=[1.0, 2.0, 3.0], squared=True)
    metric = fsl.keras.SegMetrics(NAMES, loss=loss, prefix="p_")
    clone = fsl.keras.SegMetrics.from_config(metric.get_config())
    assert clone.get_config() == metric.get_config()
    assert clone.loss.get_config() == loss.get_config()


@pytest.mark.parametrize("bad", [dict(), dict(class_names=["a", "a"]),
                                 dict(class_names=["a"], num_classes=2),
                                 dict(num_classes=2, quantities=["f1"]),
                                 dict(num_classes=2, loss="bce")])
def test_bad_arguments(bad):
    with pytest.raises(ValueError):
        fsl.keras.SegMetrics(**bad)


def test_wrong_class_count_is_reported():
    metric = fsl.keras.SegMetrics(["a", "b"])
    logits, labels = _fixed_batch(10)
    with pytest.raises(ValueError, match="class"):
        metric.update_state(labels, logits)
