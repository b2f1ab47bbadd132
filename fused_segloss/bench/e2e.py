"""End-to-end section: Keras `model.fit` steps of the demo U-Net with three losses.

Configs: fsl.keras.SegLoss() (with the shape's activation and focal_gamma); the
hand-written TF CE + Dice (loss.plain_loss) as a Keras loss; a trivial loss (the mean of
the logits), whose step is the model's own cost.
Each config lives in its own process, so its peak RSS (VmHWM when it exits) is its own.
Keras' defaults: Adam, jit_compile="auto" (no XLA on CPU; the resolved value is reported).
Data: one fixed random batch, repeated by tf.data. With channels_first, a Permute layer
(in every config alike) transposes the channels_last U-Net's logits.

The processes start and warm up (the first step traces) side by side; then the parent asks
each in turn, in rotating order, for a block of `fit` steps, so the machine's drift falls
on every config alike. A callback stamps the end of each step; the gaps between stamps
within a block are step times (a block's first step also pays `fit`'s set-up and is left
out). Step time = median gap; loss overhead = step time - the trivial config's.
"""
import json
import sys
import time

from .memory import Child, status_kib

SEGLOSS = "fsl.keras.SegLoss()"
PLAIN = "hand-written TF loss"
TRIVIAL = "trivial loss (mean of logits)"
CONFIGS = (SEGLOSS, PLAIN, TRIVIAL)


def start(shape, warmup):
    return {config: Child(__name__, {"config": config, "shape": list(shape), "warmup": warmup})
            for config in CONFIGS}


def measure(workers, rounds, block):
    """{config: {step_ms, iqr_ms, steps, gaps_ms, loss, jit_compile, peak_rss_bytes} or
    {error}}."""
    import numpy as np

    rows, gaps = {}, {}
    for config, worker in workers.items():
        try:
            rows[config], gaps[config] = worker.read(), []  # the warm-up is done
        except RuntimeError as exc:
            rows[config] = {"error": str(exc)}
    live = list(gaps)
    for r in range(rounds):
        for config in live[r % len(live):] + live[:r % len(live)]:
            reply = workers[config].ask(block)
            gaps[config] += reply["gaps_ms"]
            rows[config]["loss"] = reply["loss"]
    for config in live:
        q1, median, q3 = np.percentile(gaps[config], [25, 50, 75])
        rows[config].update(workers[config].close(), step_ms=median, iqr_ms=q3 - q1,
                            steps=len(gaps[config]), gaps_ms=gaps[config])
    return rows


def _serve(config, shape, warmup):
    import keras
    import numpy as np
    import tensorflow as tf

    import fused_segloss as fsl

    from ..demo.unet import build_unet
    from .loss import fused_options, make_inputs, plain_loss

    fmt = shape.data_format
    losses = {SEGLOSS: lambda: fsl.keras.SegLoss(**fused_options(shape)),
              PLAIN: lambda: lambda y_true, y_pred: plain_loss(y_pred, y_true, shape),
              TRIVIAL: lambda: lambda y_true, y_pred: tf.reduce_mean(y_pred)}
    keras.utils.set_random_seed(0)
    model = build_unet(shape.size, shape.classes)
    if fmt == "channels_first":
        model = keras.Model(model.inputs, keras.layers.Permute((3, 1, 2))(model.outputs[0]))
    model.compile(optimizer="adam", loss=losses[config]())
    images = np.random.default_rng(1).standard_normal((shape.batch, shape.size, shape.size, 3))
    data = tf.data.Dataset.from_tensors((images.astype("float32"), make_inputs(shape)[1]))
    data = data.repeat()
    stamps = []

    class Stamp(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            stamps.append(time.perf_counter())

    def fit(steps):
        stamps.clear()
        history = model.fit(data, epochs=1, steps_per_epoch=steps, verbose=0, shuffle=False,
                            callbacks=[Stamp()])
        return {"gaps_ms": (np.diff(stamps) * 1e3).tolist(),
                "loss": float(history.history["loss"][-1])}

    fit(warmup)
    print(json.dumps({"jit_compile": bool(model.jit_compile)}), flush=True)
    for line in sys.stdin:
        print(json.dumps(fit(int(line))), flush=True)
    print(json.dumps({"peak_rss_bytes": status_kib("VmHWM") * 1024}), flush=True)


if __name__ == "__main__":
    from .loss import Shape

    request = json.loads(sys.argv[1])
    _serve(request["config"], Shape(*request["shape"]), request["warmup"])
