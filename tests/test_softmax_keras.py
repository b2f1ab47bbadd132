"""fsl.keras.SegLoss / SegMetrics in softmax mode: sparse class ids in fit ([B, H, W] and
[B, H, W, 1], integer or float-cast), per-class metric names, mixed precision, .keras
round trip and construction errors. (MirroredStrategy: tests/test_distribute.py's
softmax option sets.)"""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

import fused_segloss as fsl  # noqa: E402

B, H, W, C = 4, 6, 5, 3
NAMES = ["background", "road", "car"]
OPTIONS = dict(activation="softmax", ignore_index=255, include_background=False,
               class_weights=[1.0, 2.0, 3.0])


def _data(seed=0):
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(B, H, W, 2)).astype(np.float32)
    ids = rng.choice(3, size=(B, H, W), p=[0.6, 0.3, 0.1]).astype(np.int32)
    ids[rng.random((B, H, W)) < 0.1] = 255
    return images, ids


def _tiny_model():
    keras.utils.set_random_seed(1)
    inputs = keras.Input((H, W, 2))
    hidden = keras.layers.Conv2D(4, 3, padding="same", activation="tanh")(inputs)
    return keras.Model(inputs, keras.layers.Conv2D(C, 1)(hidden))


@pytest.mark.parametrize("form", ["ids", "ids-class-axis", "float-ids", "float-ids-class-axis",
                                  "uint8-ids", "ids-xla"])
def test_fit_with_sparse_labels_trains_and_reports_seg_loss(form):
    images, ids = _data()
    labels = {"ids": ids, "ids-class-axis": ids[..., None], "float-ids": ids.astype(np.float32),
              "float-ids-class-axis": ids[..., None].astype(np.float32),
              "uint8-ids": ids.astype(np.uint8), "ids-xla": ids}[form]
    model = _tiny_model()
    loss = fsl.keras.SegLoss(**OPTIONS)
    model.compile(keras.optimizers.SGD(0.5), loss=loss, jit_compile=form == "ids-xla")
    history = model.fit(images, labels, batch_size=B, epochs=4, shuffle=False, verbose=0)
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
    evaluated = model.evaluate(images, labels, batch_size=B, verbose=0)
    direct = fsl.seg_loss(model(images), ids, **OPTIONS)
    np.testing.assert_allclose(evaluated, direct.numpy(), rtol=1e-6)


def test_float_and_integer_ids_give_the_same_loss():
    images, ids = _data(1)
    logits = _tiny_model()(images)
    loss = fsl.keras.SegLoss(**OPTIONS)
    want = loss(ids, logits).numpy()
    for labels in (ids.astype(np.float32), ids[..., None].astype(np.float32),
                   ids[..., None].astype(np.int64)):
        assert loss(labels, logits).numpy() == want


def test_dense_float_labels_stay_dense():
    images, ids = _data(2)
    logits = _tiny_model()(images)
    one_hot = np.eye(C, dtype=np.float32)[np.where(ids == 255, 0, ids)]
    loss = fsl.keras.SegLoss(activation="softmax")
    want = fsl.seg_loss(logits, np.where(ids == 255, 0, ids), activation="softmax")
    np.testing.assert_allclose(loss(one_hot, logits), want, rtol=1e-6)


def test_fit_logs_per_class_metrics_with_the_chosen_overlap():
    images, ids = _data(3)
    model = _tiny_model()
    loss = fsl.keras.SegLoss(overlap="jaccard", **OPTIONS)
    metric = fsl.keras.SegMetrics(NAMES, loss=loss)
    assert metric.activation == "softmax" and metric.ignore_index == 255
    model.compile(keras.optimizers.SGD(0.0), loss=loss, metrics=[metric])
    logs = model.evaluate(images, ids, batch_size=B, verbose=0, return_dict=True)
    expected_keys = {f"{q}/{n}" for q in ("dice", "iou", "ce", "jaccard") for n in NAMES}
    assert expected_keys <= set(logs)
    res = fsl.seg_loss_result(model(images), ids, overlap="jaccard", **OPTIONS)
    for q, values in (("dice", res.dice_per_class), ("iou", res.iou_per_class),
                      ("ce", res.ce_per_class), ("jaccard", res.overlap_per_class)):
        for name, value in zip(NAMES, values.numpy()):
            np.testing.assert_allclose(logs[f"{q}/{name}"], value, rtol=1e-5, atol=1e-7,
                                       err_msg=f"{q}/{name}")


def test_metric_without_a_loss_takes_softmax_options():
    images, ids = _data(4)
    logits = _tiny_model()(images)
    metric = fsl.keras.SegMetrics(NAMES, activation="softmax", ignore_index=255,
                                  overlap="tversky", tversky_alpha=0.3, tversky_beta=0.7)
    metric.update_state(ids[..., None].astype(np.float32), logits)
    result = metric.result()
    res = fsl.seg_loss_result(logits, ids, activation="softmax", ignore_index=255,
                              overlap="tversky", tversky_alpha=0.3, tversky_beta=0.7)
    np.testing.assert_allclose([result[f"tversky/{n}"] for n in NAMES], res.overlap_per_class,
                               rtol=1e-5)
    np.testing.assert_allclose([result[f"ce/{n}"] for n in NAMES], res.ce_per_class, rtol=1e-5)
    clone = fsl.keras.SegMetrics.from_config(metric.get_config())
    assert clone.get_config() == metric.get_config()


def test_mixed_float16_logits_give_the_float32_loss_of_the_same_values():
    images, ids = _data(5)
    logits = _tiny_model()(images)
    half = tf.cast(logits, tf.float16)
    loss = fsl.keras.SegLoss(**OPTIONS)
    value = loss(ids, half)
    assert value.dtype == tf.float32
    same_values = fsl.seg_loss(tf.cast(half, tf.float32), ids, **OPTIONS)
    np.testing.assert_allclose(value.numpy(), same_values.numpy(), rtol=1e-6)


def test_training_under_mixed_float16_matches_float32():
    images, ids = _data(6)
    previous = keras.mixed_precision.global_policy()
    results = {}
    try:
        for policy in ("float32", "mixed_float16"):
            keras.mixed_precision.set_global_policy(policy)
            model = _tiny_model()
            model.compile(keras.optimizers.SGD(0.5), loss=fsl.keras.SegLoss(**OPTIONS))
            history = model.fit(images, ids, batch_size=B, epochs=3, shuffle=False, verbose=0)
            results[policy] = history.history["loss"]
            assert model.output.dtype == ("float16" if policy != "float32" else "float32")
    finally:
        keras.mixed_precision.set_global_policy(previous)
    assert np.all(np.isfinite(results["mixed_float16"]))
    # float16 activations round to 2^-11 relative; through a 2-layer model the loss moves
    # by ~1e-4 relative (as tests/test_mixed_precision.py measures), below its change per
    # epoch, so a run with a wrong gradient still fails.
    np.testing.assert_allclose(results["mixed_float16"], results["float32"], rtol=2e-3)
    assert results["float32"][-1] < results["float32"][0]


def test_keras_file_round_trip_keeps_softmax_loss_and_metrics(tmp_path):
    images, ids = _data(7)
    model = _tiny_model()
    loss = fsl.keras.SegLoss(focal_gamma=2.0, dice_mode="per_image", name="softmax_loss",
                             **OPTIONS)
    model.compile("sgd", loss=loss, metrics=[fsl.keras.SegMetrics(NAMES, loss=loss)])
    before = model.evaluate(images, ids, batch_size=B, verbose=0, return_dict=True)
    path = tmp_path / "model.keras"
    model.save(path)
    restored = keras.models.load_model(path)
    assert isinstance(restored.loss, fsl.keras.SegLoss)
    config = restored.loss.get_config()
    assert config == loss.get_config()
    assert (config["activation"], config["ignore_index"], config["include_background"]) == \
        ("softmax", 255, False)
    after = restored.evaluate(images, ids, batch_size=B, verbose=0, return_dict=True)
    assert set(after) == set(before) and "iou/car" in after
    for key in before:
        np.testing.assert_allclose(after[key], before[key], rtol=1e-6, err_msg=key)


def test_from_config_round_trip_gives_an_equal_loss():
    images, ids = _data(8)
    logits = _tiny_model()(images)
    loss = fsl.keras.SegLoss(**OPTIONS)
    clone = fsl.keras.SegLoss.from_config(loss.get_config())
    assert clone.get_config() == loss.get_config()
    assert clone(ids, logits).numpy() == loss(ids, logits).numpy()


@pytest.mark.parametrize("options, fragments", [
    (dict(activation="softmax", pos_weight=[1.0, 2.0, 3.0]), ("`pos_weight`", "softmax")),
    (dict(activation="softmax", focal_alpha=0.25), ("`focal_alpha`", "softmax")),
    (dict(include_background=False), ("`include_background`", "`activation`='softmax'")),
    (dict(ignore_index=255), ("`ignore_index`", "softmax")),
    (dict(activation="softmax", ignore_index="255"), ("`ignore_index`", "int")),
    (dict(activation="sparse"), ("`activation`", "'sigmoid', 'softmax'")),
])
def test_bad_options_raise_at_construction(options, fragments):
    with pytest.raises(ValueError) as info:
        fsl.keras.SegLoss(**options)
    for fragment in fragments:
        assert fragment in str(info.value)
