"""fsl.keras.SegLoss: value, options, sample_weight, model.fit (eager/graph/XLA), .keras round trip."""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

import fused_segloss as fsl  # noqa: E402
import numpy_reference as npref  # noqa: E402

B, H, W, C = 4, 6, 5, 3


def _batch(seed=0, channels_first=False):
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=2.0, size=(B, H, W, C)).astype(np.float32)
    labels = (rng.random((B, H, W, C)) < [0.5, 0.2, 0.05]).astype(np.float32)
    labels[1, ..., 2] = 0.0  # an image without the rare class
    if channels_first:
        return np.moveaxis(logits, -1, 1).copy(), np.moveaxis(labels, -1, 1).copy()
    return logits, labels


OPTION_SETS = [
    {},
    {"class_weights": [1.0, 2.0, 5.0], "pos_weight": [1.0, 3.0, 10.0]},
    {"ce_weight": 0.3, "dice_weight": 2.0, "smooth": 1.0, "empty": "exclude"},
    {"dice_mode": "per_image", "empty": "exclude"},
    {"dice_mode": "per_image"},
]


def _numpy_loss(logits, labels, weights=None, **options):
    st = npref.stats(logits, labels, weights, options.get("pos_weight"))
    combine_options = {k: v for k, v in options.items()
                       if k in ("ce_weight", "dice_weight", "dice_mode", "smooth", "empty",
                                "class_weights")}
    return npref.combine(st, **combine_options).total


# Eagerly both run the same traced `combine`, and inside a graph (as under `fit`) the same
# ops: the Keras loss is seg_loss bit for bit either way.
def _assert_same_loss(actual, expected):
    np.testing.assert_array_equal(actual, expected)


@pytest.mark.parametrize("options", OPTION_SETS)
def test_inside_a_graph_the_loss_is_seg_loss_bit_for_bit(options):
    logits, labels = _batch()
    loss = fsl.keras.SegLoss(**options)

    @tf.function(autograph=False)
    def both(y_true, y_pred):
        return loss(y_true, y_pred), fsl.seg_loss(y_pred, y_true, **options)

    value, expected = both(labels, logits)
    np.testing.assert_array_equal(value.numpy(), expected.numpy())


@pytest.mark.parametrize("options", OPTION_SETS)
def test_call_equals_seg_loss_and_numpy(options):
    logits, labels = _batch()
    value = fsl.keras.SegLoss(**options)(labels, logits)
    assert value.dtype == tf.float32 and value.shape == ()
    _assert_same_loss(value.numpy(), fsl.seg_loss(logits, labels, **options).numpy())
    np.testing.assert_allclose(value.numpy(), _numpy_loss(logits, labels, **options), rtol=2e-6)


@pytest.mark.parametrize("options", [{"squared": True}, {"data_format": "channels_first"},
                                     {"data_format": "channels_first", "pos_weight": [2.0, 1, 1]}])
def test_stats_options_are_forwarded(options):
    logits, labels = _batch(channels_first=options.get("data_format") == "channels_first")
    value = fsl.keras.SegLoss(**options)(labels, logits)
    _assert_same_loss(value.numpy(), fsl.seg_loss(logits, labels, **options).numpy())
    expected = npref.combine(npref.stats(
        logits, labels, None, options.get("pos_weight"),
        data_format=options.get("data_format", "channels_last"),
        squared=options.get("squared", False))).total
    np.testing.assert_allclose(value.numpy(), expected, rtol=2e-6)


@pytest.mark.parametrize("reduction", ["sum_over_batch_size", "sum", "mean", "mean_with_sample_weight"])
def test_scalar_reductions_are_the_batch_loss(reduction):
    logits, labels = _batch(1)
    weight = np.array([1.0, 0.0, 2.0, 0.5], np.float32)
    value = fsl.keras.SegLoss(reduction=reduction)(labels, logits, sample_weight=weight)
    expected = fsl.seg_loss(logits, labels, weights=weight.reshape(B, 1, 1, 1))
    _assert_same_loss(value.numpy(), expected.numpy())


def test_reduction_none_gives_each_images_own_loss():
    logits, labels = _batch(2)
    values = fsl.keras.SegLoss(reduction="none", class_weights=[1, 2, 3])(labels, logits)
    assert values.shape == (B,)
    for b in range(B):
        np.testing.assert_allclose(
            values[b].numpy(),
            _numpy_loss(logits[b:b + 1], labels[b:b + 1], class_weights=[1, 2, 3]), rtol=2e-6)


# sample_weight shape -> the element weights it must be equivalent to
SAMPLE_WEIGHT_CASES = {
    "per_image": (lambda r: r.random(B), lambda w: w.reshape(B, 1, 1, 1)),
    "per_image_column": (lambda r: r.random((B, 1)), lambda w: w.reshape(B, 1, 1, 1)),
    "per_pixel": (lambda r: r.random((B, H, W)), lambda w: w[..., None]),
    "per_pixel_keepdim": (lambda r: r.random((B, H, W, 1)), lambda w: w),
    "per_pixel_and_class": (lambda r: r.random((B, H, W, C)), lambda w: w),
    "ignore_mask": (lambda r: (r.random((B, H, W)) > 0.3).astype(np.float64), lambda w: w[..., None]),
}


@pytest.mark.parametrize("case", sorted(SAMPLE_WEIGHT_CASES))
def test_sample_weight_shapes(case):
    make, as_elements = SAMPLE_WEIGHT_CASES[case]
    logits, labels = _batch(3)
    weight = make(np.random.default_rng(7)).astype(np.float32)
    value = fsl.keras.SegLoss(pos_weight=[1, 2, 3])(labels, logits, sample_weight=weight)
    elements = as_elements(weight)
    _assert_same_loss(
        value.numpy(), fsl.seg_loss(logits, labels, weights=elements, pos_weight=[1, 2, 3]).numpy())
    np.testing.assert_allclose(value.numpy(),
                               _numpy_loss(logits, labels, elements, pos_weight=[1, 2, 3]), rtol=2e-6)


def test_per_pixel_sample_weight_channels_first():
    logits, labels = _batch(4, channels_first=True)
    weight = np.random.default_rng(8).random((B, H, W)).astype(np.float32)
    value = fsl.keras.SegLoss(data_format="channels_first")(labels, logits, sample_weight=weight)
    np.testing.assert_allclose(
        value.numpy(), _numpy_loss(np.moveaxis(logits, 1, -1), np.moveaxis(labels, 1, -1),
                                   weight[..., None]), rtol=2e-6)


def test_sample_weight_that_does_not_fit_is_rejected():
    logits, labels = _batch()
    with pytest.raises(ValueError, match="sample_weight"):
        fsl.keras.SegLoss()(labels, logits, sample_weight=np.ones((B, H), np.float32))


@pytest.mark.parametrize("bad", [{"dice_mode": "global"}, {"empty": "drop"}, {"smooth": -1.0},
                                 {"class_weights": [1.0, -1.0]}, {"class_weights": [0.0, 0.0]},
                                 {"pos_weight": [[1.0]]}, {"data_format": "NHWC"},
                                 {"implementation": "fast"}, {"reduction": "max"},
                                 {"squared": 1}])
def test_bad_options_raise_at_construction(bad):
    with pytest.raises(ValueError):
        fsl.keras.SegLoss(**bad)


def _tiny_model(seed=1):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((H, W, 2))
    hidden = keras.layers.Conv2D(4, 3, padding="same", activation="tanh")(inputs)
    return keras.Model(inputs, keras.layers.Conv2D(C, 1)(hidden))


@pytest.mark.parametrize("mode", ["eager", "graph", "xla"])
def test_fit_step_equals_reference_loss_and_update(mode):
    rng = np.random.default_rng(5)
    images = rng.normal(size=(B, H, W, 2)).astype(np.float32)
    _, labels = _batch(5)
    weight = rng.random((B, H, W)).astype(np.float32)
    options = {"class_weights": [1.0, 1.0, 3.0], "pos_weight": [1.0, 2.0, 4.0]}
    model = _tiny_model()
    learning_rate = 0.5

    # The oracle: the pure-TF reference path, differentiated by TF autodiff.
    with tf.GradientTape() as tape:
        expected_loss = fsl.seg_loss(model(images), labels, weights=weight[..., None],
                                     implementation="reference", **options)
    grads = tape.gradient(expected_loss, model.trainable_weights)
    expected_weights = [(v - learning_rate * g).numpy() for v, g in zip(model.trainable_weights, grads)]

    model.compile(keras.optimizers.SGD(learning_rate), loss=fsl.keras.SegLoss(**options),
                  run_eagerly=mode == "eager", jit_compile=mode == "xla")
    history = model.fit(images, labels, sample_weight=weight, batch_size=B, epochs=1,
                        shuffle=False, verbose=0)
    np.testing.assert_allclose(history.history["loss"][0], expected_loss.numpy(), rtol=1e-6)
    for got, want in zip(model.trainable_weights, expected_weights):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)


def test_keras_file_round_trip_keeps_loss_and_metrics(tmp_path):
    logits_model = _tiny_model(3)
    options = dict(ce_weight=0.5, dice_weight=2.0, dice_mode="per_image", smooth=0.5,
                   empty="exclude", class_weights=[1.0, 2.0, 3.0], pos_weight=[2.0, 1.0, 0.5],
                   squared=True, name="my_seg_loss")
    loss = fsl.keras.SegLoss(**options)
    logits_model.compile("sgd", loss=loss,
                         metrics=[fsl.keras.SegMetrics(["x", "y", "z"], loss=loss)])
    rng = np.random.default_rng(9)
    images = rng.normal(size=(B, H, W, 2)).astype(np.float32)
    _, labels = _batch(9)
    before = logits_model.evaluate(images, labels, batch_size=B, verbose=0, return_dict=True)

    path = tmp_path / "model.keras"
    logits_model.save(path)
    restored = keras.models.load_model(path)
    assert isinstance(restored.loss, fsl.keras.SegLoss)
    assert restored.loss.get_config() == loss.get_config()
    after = restored.evaluate(images, labels, batch_size=B, verbose=0, return_dict=True)
    assert set(after) == set(before) and "iou/z" in after
    for key in before:
        np.testing.assert_allclose(after[key], before[key], rtol=1e-6, err_msg=key)
    direct = fsl.seg_loss(logits_model(images), labels,
                          **{k: v for k, v in options.items() if k != "name"})
    np.testing.assert_allclose(after["loss"], direct.numpy(), rtol=1e-6)


def test_from_config_round_trip():
    loss = fsl.keras.SegLoss(class_weights=np.array([1, 2]), pos_weight=tf.constant([3.0, 4.0]),
                             dtype="float64", reduction="sum")
    clone = fsl.keras.SegLoss.from_config(loss.get_config())
    assert clone.get_config() == loss.get_config()
    assert clone.class_weights == (1.0, 2.0) and clone.pos_weight == (3.0, 4.0)
    logits, labels = _batch(10)
    logits, labels = logits[..., :2], labels[..., :2]
    value = clone(labels, logits)
    assert value.dtype == tf.float64  # an explicit dtype is the loss' dtype
    # The statistics are float32 for every input dtype, hence float32 rounding.
    np.testing.assert_allclose(value.numpy(),
                               _numpy_loss(logits, labels, class_weights=[1, 2], pos_weight=[3, 4]),
                               rtol=2e-6)
