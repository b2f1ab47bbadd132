"""SegLoss under tf.distribute: the loss, metrics and update of the *global* batch.

TF's logical devices must be configured before TF initialises its devices, and
MultiWorkerMirroredStrategy needs one process per worker, so every case runs this file as
a script in fresh processes (`python test_distribute.py MODE OUT.json`) and the tests
compare their JSON results. One training step (SGD, learning rate 0.5) on a global batch
of 8 images with per-image sample weights, for five loss configurations (focal and the
overlap variants included):

    single    Keras model.fit on one device (the reference)
    mirrored  Keras model.fit under MirroredStrategy on 2 logical CPU devices
    worker    a hand-written step under MultiWorkerMirroredStrategy, two worker processes
              on 127.0.0.1 (Keras 3's fit does not run under that strategy:
              keras-team/keras#20585), each reading its own half of the batch
"""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

NAMES = ["a", "b", "c"]
OPTION_SETS = {
    "batch": {},
    "batch_weighted": {"class_weights": [1.0, 2.0, 4.0], "pos_weight": [1.0, 3.0, 9.0]},
    "per_image_exclude": {"dice_mode": "per_image", "empty": "exclude"},
    "focal_generalized_dice": {"dice_mode": "per_image", "overlap": "generalized_dice",
                               "focal_gamma": 2.0, "focal_alpha": 0.25},
    "tversky": {"overlap": "tversky", "tversky_alpha": 0.3, "tversky_beta": 0.7},
    # Softmax mode with sparse class ids [B, H, W] (255: ignored), see _labels_for.
    "softmax_sparse": {"activation": "softmax", "ignore_index": 255,
                       "include_background": False, "class_weights": [1.0, 2.0, 4.0]},
    "softmax_per_image_focal": {"activation": "softmax", "ignore_index": 255,
                                "dice_mode": "per_image", "empty": "exclude",
                                "focal_gamma": 2.0},
}
GLOBAL_BATCH, SIZE, LEARNING_RATE = 8, 10, 0.5
TOLERANCE = 1e-5  # the bound: float32 sums in another order differ by ~1e-7
PROCESS_TIMEOUT_S = 240


# --------------------------------------------------------------------------- the script
def _data():
    rng = np.random.default_rng(0)
    images = rng.normal(size=(GLOBAL_BATCH, SIZE, SIZE, 2)).astype(np.float32)
    labels = (rng.random((GLOBAL_BATCH, SIZE, SIZE, 3)) < [0.5, 0.15, 0.03]).astype(np.float32)
    labels[5:, ..., 2] = 0.0  # the second half lacks class c: a per-replica Dice would differ
    weight = np.linspace(0.2, 2.0, GLOBAL_BATCH).astype(np.float32)
    return images, labels, weight


def _labels_for(options, labels):
    """The multi-label masks, or for softmax the class ids [B, H, W] (int32) derived from
    them: the first class present, 255 (ignored) where none is."""
    if options.get("activation") != "softmax":
        return labels
    return np.where(labels.any(-1), labels.argmax(-1), 255).astype(np.int32)


def _build(keras, initial=None):
    keras.utils.set_random_seed(1)
    inputs = keras.Input((SIZE, SIZE, 2))
    hidden = keras.layers.Conv2D(4, 3, padding="same", activation="tanh")(inputs)
    model = keras.Model(inputs, keras.layers.Conv2D(3, 1)(hidden))
    if initial is not None:
        model.set_weights(initial)
    return model


def _fit_one_step(keras, fsl, options, initial):
    model = _build(keras, initial)
    loss = fsl.keras.SegLoss(**options)
    model.compile(keras.optimizers.SGD(LEARNING_RATE), loss=loss,
                  weighted_metrics=[fsl.keras.SegMetrics(NAMES, loss=loss)])
    images, labels, weight = _data()
    history = model.fit(images, _labels_for(options, labels), sample_weight=weight,
                        batch_size=GLOBAL_BATCH,
                        epochs=1, shuffle=False, verbose=0)
    return {"logs": {k: float(v[0]) for k, v in history.history.items()},
            "weights": [w.tolist() for w in model.get_weights()]}


def _custom_loop_one_step(tf, keras, fsl, strategy, options, initial):
    images, labels, weight = _data()
    labels = _labels_for(options, labels)
    with strategy.scope():
        model = _build(keras, initial)
        optimizer = keras.optimizers.SGD(LEARNING_RATE)
        optimizer.build(model.trainable_variables)
        loss = fsl.keras.SegLoss(**options)
        metric = fsl.keras.SegMetrics(NAMES, loss=loss)

    def dataset_fn(context):
        per_worker = GLOBAL_BATCH // context.num_input_pipelines
        part = slice(context.input_pipeline_id * per_worker, (context.input_pipeline_id + 1) * per_worker)
        return tf.data.Dataset.from_tensor_slices(
            (images[part], labels[part], weight[part])).batch(per_worker)

    batch = next(iter(strategy.distribute_datasets_from_function(dataset_fn)))

    @tf.function
    def step(batch):
        def replica_step(x, y, w):
            with tf.GradientTape() as tape:
                logits = model(x, training=True)
                value = loss(y, logits, sample_weight=w)
            grads = tape.gradient(value, model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables))
            metric.update_state(y, logits, sample_weight=w)
            return value

        per_replica = strategy.run(replica_step, args=batch)
        # Keras' convention, which SegLoss follows: the replicas' values sum to the global loss.
        return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

    logs = {"loss": float(step(batch))}
    logs.update({k: float(v) for k, v in metric.result().items()})
    return {"logs": logs, "weights": [w.tolist() for w in model.get_weights()]}


def _script(mode, out_path):
    if mode not in ("single", "mirrored", "worker"):
        raise SystemExit(f"unknown mode {mode!r}")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    if mode == "mirrored":  # before anything initialises TF's devices
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras

    import fused_segloss as fsl

    strategy = None  # created before anything else touches TF's runtime, as both need
    if mode == "mirrored":
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    elif mode == "worker":
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    assert strategy is None or strategy.num_replicas_in_sync == 2

    initial = [np.asarray(w) for w in _build(keras).get_weights()]  # the same start everywhere
    results = {"initial": [w.tolist() for w in initial]}
    if mode == "single":
        for key, options in OPTION_SETS.items():
            results[key] = _fit_one_step(keras, fsl, options, initial)
        images, labels, weight = _data()
        logits = _build(keras, initial)(images)
        # What each replica would compute from its own half: the exchange must matter.
        results["half_batch_losses"] = [
            float(fsl.seg_loss(logits[h], labels[h], weights=weight[h][:, None, None, None]))
            for h in (slice(0, 4), slice(4, 8))]
    elif mode == "mirrored":
        for key, options in OPTION_SETS.items():
            with strategy.scope():
                results[key] = _fit_one_step(keras, fsl, options, initial)
    elif mode == "worker":
        for key, options in OPTION_SETS.items():
            results[key] = _custom_loop_one_step(tf, keras, fsl, strategy, options, initial)
    with open(out_path, "w") as f:
        json.dump(results, f)


# --------------------------------------------------------------------------- the tests
def _environment(**extra):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    env.pop("TF_CONFIG", None)
    env.update(extra)
    return env


def _run_processes(modes_and_envs, tmp_path):
    """Starts the scripts together, waits (bounded), always reaps them; returns their JSON."""
    procs = []
    try:
        for i, (mode, env) in enumerate(modes_and_envs):
            out = tmp_path / f"{mode}_{i}.json"
            log = open(tmp_path / f"{mode}_{i}.log", "w")
            procs.append((subprocess.Popen([sys.executable, __file__, mode, str(out)], env=env,
                                           stdout=log, stderr=subprocess.STDOUT), out, log))
        results = []
        for proc, out, log in procs:
            code = proc.wait(timeout=PROCESS_TIMEOUT_S)
            log.close()
            if code != 0:
                tail = open(log.name).read()[-3000:]
                pytest.fail(f"{' '.join(proc.args[2:3])} exited with {code}:\n{tail}")
            results.append(json.loads(out.read_text()))
        return results
    finally:
        for proc, _, log in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    (result,) = _run_processes([("single", _environment())], tmp_path_factory.mktemp("single"))
    return result


def _assert_same_step(got, want):
    for key in OPTION_SETS:
        assert set(got[key]["logs"]) == set(want[key]["logs"])
        for name, value in want[key]["logs"].items():
            np.testing.assert_allclose(got[key]["logs"][name], value, rtol=0, atol=TOLERANCE,
                                       err_msg=f"{key}: {name}")
        for got_w, want_w in zip(got[key]["weights"], want[key]["weights"]):
            np.testing.assert_allclose(got_w, want_w, rtol=0, atol=TOLERANCE, err_msg=key)


def test_the_reference_step_is_a_meaningful_comparison(single):
    """The halves' own losses differ from the global one, and the step moves the weights."""
    global_loss = single["batch"]["logs"]["loss"]
    assert max(abs(h - global_loss) for h in single["half_batch_losses"]) > 100 * TOLERANCE
    assert abs(np.mean(single["half_batch_losses"]) - global_loss) > 100 * TOLERANCE
    for key in OPTION_SETS:
        moved = max(np.abs(np.array(a) - np.array(b)).max()
                    for a, b in zip(single[key]["weights"], single["initial"]))
        assert moved > 1000 * TOLERANCE, key


@pytest.mark.slow
def test_mirrored_strategy_on_two_devices_equals_one_device(single, tmp_path):
    (mirrored,) = _run_processes([("mirrored", _environment())], tmp_path)
    _assert_same_step(mirrored, single)


@pytest.mark.slow
def test_multi_worker_mirrored_on_localhost_equals_one_process(single, tmp_path):
    cluster = {"worker": [f"127.0.0.1:{_free_port()}", f"127.0.0.1:{_free_port()}"]}
    workers = [("worker", _environment(TF_CONFIG=json.dumps(
        {"cluster": cluster, "task": {"type": "worker", "index": i}}))) for i in range(2)]
    for result in _run_processes(workers, tmp_path):
        _assert_same_step(result, single)


if __name__ == "__main__":
    _script(sys.argv[1], sys.argv[2])
