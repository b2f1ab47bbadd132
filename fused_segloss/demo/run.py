"""`python -m fused_segloss demo`: a U-Net on synthetic segmentation images, per class.

--task multilabel (default): sigmoid outputs, float 0/1 masks. It first trains with plain
sigmoid cross-entropy (the seeds' setup: a small total loss while the rare class is never
found), then with SegLoss variants. --task multiclass: softmax outputs, one class per pixel,
sparse uint8 labels with an ignored region; runs show what include_background and
class_weights change for the rare class. For each run it prints the per-class CE, soft
Dice, hard IoU and share of the total loss on a fixed validation set, then a comparison of
the runs, and a PNG of the per-class curves from the Keras logs.
"""
import argparse
import os
import sys
import time

from .data import CLASS_NAMES, IGNORE_ID, MULTICLASS_NAMES, RARE_CLASS, batches, draw_batch

# (label, SegLoss options). The same data stream and initial weights for every run.
RUNS = (
    ("CE only: the seeds' sigmoid cross-entropy", {"dice_weight": 0.0}),
    ("CE + batch Dice (SegLoss defaults)", {}),
    ("CE + Dice, class_weights & pos_weight on spot",
     {"class_weights": [1, 1, 1, 1, 3], "pos_weight": [1, 1, 1, 1, 10]}),
    ("CE + per-image Dice, empty='include'", {"dice_mode": "per_image"}),
    ("CE + per-image Dice, empty='exclude'", {"dice_mode": "per_image", "empty": "exclude"}),
    ("focal CE (g=2) + Tversky (a=0.3, b=0.7)",
     {"focal_gamma": 2.0, "overlap": "tversky", "tversky_alpha": 0.3, "tversky_beta": 0.7}),
)
MULTICLASS_RUNS = (
    ("softmax CE only", {"dice_weight": 0.0}),
    ("softmax CE + Dice (include_background=True)", {}),
    ("softmax CE + Dice, include_background=False", {"include_background": False}),
    ("... and class_weights 5x on spot",
     {"include_background": False, "class_weights": [1, 1, 1, 1, 1, 5]}),
)
# task -> (class names, runs, options every run shares)
TASKS = {"multilabel": (CLASS_NAMES, RUNS, {}),
         "multiclass": (MULTICLASS_NAMES, MULTICLASS_RUNS,
                        {"activation": "softmax", "ignore_index": IGNORE_ID})}
RARE = CLASS_NAMES[RARE_CLASS]  # the same name in both tasks
QUICK = dict(size=32, batch_size=4, steps=6, epochs=2, val_images=8, runs="1,2")


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python -m fused_segloss demo",
        description="Train a small U-Net with fused_segloss on synthetic images and report "
                    "every class's loss terms.")
    parser.add_argument("--task", choices=tuple(TASKS), default="multilabel",
                        help="multilabel: sigmoid, overlapping 0/1 masks (default); multiclass: "
                             "softmax, one uint8 class id per pixel, an ignored region")
    parser.add_argument("--steps", type=int, default=320, help="training steps per run (default 320)")
    parser.add_argument("--epochs", type=int, default=8,
                        help="the steps are split into this many epochs: points on the curves")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (multiple of 16)")
    parser.add_argument("--val-images", type=int, default=96, help="fixed validation images")
    parser.add_argument("--runs", help="which runs, by number (default: all of the task's): "
                        + " | ".join(f"{task}: " + "; ".join(
                            f"{i + 1}: {label}" for i, (label, _) in enumerate(runs))
                            for task, (_, runs, _) in TASKS.items()))
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="segloss_demo", help="folder for the PNG (default ./segloss_demo)")
    parser.add_argument("--verbose", type=int, choices=(0, 1, 2), default=None,
                        help="Keras progress: 1 a bar, 2 a line per epoch (default: 1 on a terminal)")
    parser.add_argument("--quick", action="store_true",
                        help="a tiny smoke run (32 px, 6 steps, 2 runs) for tests")
    args = parser.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    if args.size % 16:
        parser.error("--size must be a multiple of 16 (four 2x poolings)")
    args.class_names, args.task_runs, args.task_options = TASKS[args.task]
    if args.runs is None:
        args.runs = ",".join(str(i + 1) for i in range(len(args.task_runs)))
    try:
        args.run_indices = sorted({int(i) - 1 for i in args.runs.split(",")})
    except ValueError:
        parser.error(f"--runs must be numbers separated by commas, got {args.runs!r}")
    if not args.run_indices or not all(0 <= i < len(args.task_runs) for i in args.run_indices):
        parser.error(f"--runs must name runs 1 to {len(args.task_runs)} of --task {args.task}")
    if args.steps < args.epochs or args.epochs < 1:
        parser.error("need --steps >= --epochs >= 1")
    if args.verbose is None:
        args.verbose = 1 if sys.stdout.isatty() else 2
    return args


def _compact_progbar(keras):
    class CompactProgbar(keras.callbacks.ProgbarLogger):
        """Keras' progress bar showing the loss and the per-class IoU only (all values stay in
        the History): fifteen per-class numbers do not fit on one line."""

        @staticmethod
        def _short(logs):
            return {k: v for k, v in (logs or {}).items()
                    if k in ("loss", "val_loss") or k.startswith(("iou/", "val_iou/"))}

        def on_train_batch_end(self, batch, logs=None):
            super().on_train_batch_end(batch, self._short(logs))

        def on_epoch_end(self, epoch, logs=None):
            super().on_epoch_end(epoch, self._short(logs))

    return CompactProgbar()


def train_one(label, options, args, validation):
    import keras

    import fused_segloss as fsl
    from .report import class_breakdown
    from .unet import build_unet

    names = args.class_names
    keras.utils.set_random_seed(args.seed)
    model = build_unet(args.size, len(names))
    loss = fsl.keras.SegLoss(**args.task_options, **options)
    model.compile(optimizer=keras.optimizers.Adam(args.learning_rate), loss=loss,
                  metrics=[fsl.keras.SegMetrics(names, loss=loss)])
    steps_per_epoch = args.steps // args.epochs
    callbacks = [_compact_progbar(keras)] if args.verbose else []
    started = time.perf_counter()
    history = model.fit(batches(args.seed + 1, args.batch_size, args.size, args.task),
                        steps_per_epoch=steps_per_epoch, epochs=args.epochs,
                        validation_data=validation, validation_batch_size=32,
                        shuffle=False, verbose=args.verbose, callbacks=callbacks)
    seconds = time.perf_counter() - started
    logits = model.predict(validation[0], batch_size=32, verbose=0)
    stats = fsl.segloss_stats(logits, validation[1], pos_weight=loss.pos_weight,
                              **loss.stats_options).numpy()
    breakdown = class_breakdown(stats, **loss.combine_options)
    breakdown["names"] = list(names)
    return history.history, steps_per_epoch, breakdown, seconds


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    import numpy as np

    import fused_segloss as fsl
    from .report import format_class_table, format_comparison, plot_curves

    names = args.class_names
    rng = np.random.default_rng(10_000 + args.seed)
    validation = draw_batch(rng, args.val_images, args.size, args.task)
    path = "the fused op" if fsl.fused_available() else "the pure-TF reference (op library not built)"
    kind = ("softmax outputs, uint8 class ids, ignore_index=255 on unannotated regions"
            if args.task == "multiclass" else "sigmoid outputs, 0/1 masks")
    print(f"fused_segloss demo ({args.task}): U-Net 8->128 filters, {len(names)} {kind} "
          f"({', '.join(names)}; '{RARE}' is rare), {args.size}x{args.size} images, batch "
          f"{args.batch_size}, {args.steps} steps per run, loss via {path}.")

    started = time.perf_counter()
    results = []
    for index in args.run_indices:
        label, options = args.task_runs[index]
        print(f"\n=== run {index + 1}: {label}   "
              f"SegLoss({_format_options({**args.task_options, **options})})")
        history, steps_per_epoch, breakdown, seconds = train_one(label, options, args, validation)
        results.append((label, history, steps_per_epoch, breakdown))
        print(f"\nrun {index + 1} on {args.val_images} validation images ({seconds:.0f} s of training):")
        print(format_class_table(breakdown, names))

    print("\n=== comparison (validation set; 'total loss' is each run's own loss)")
    print(format_comparison([(label, b) for label, _, _, b in results], RARE))
    try:
        import matplotlib  # noqa: F401 - the optional extra `plot`
    except ImportError:
        print("\nper-class curves: skipped (matplotlib is not installed: "
              "pip install matplotlib)")
    else:
        os.makedirs(args.out, exist_ok=True)
        suffix = "" if args.task == "multilabel" else f"_{args.task}"
        png = os.path.join(args.out, f"per_class_curves{suffix}.png")
        plot_curves([(label, history, spe) for label, history, spe, _ in results], names, png)
        print(f"\nper-class curves: {png}")
    print(f"total time {time.perf_counter() - started:.0f} s")
    return 0


def _format_options(options):
    return ", ".join(f"{k}={v!r}" for k, v in options.items())
