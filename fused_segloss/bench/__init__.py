"""Does fused_segloss pay off on this machine, for these shapes?

    python -m fused_segloss bench --batch 8 --size 512 --classes 5
    python -m fused_segloss bench --activation softmax --classes 21   # uint8 class ids
    python -m fused_segloss bench --focal-gamma 2                      # focal CE
    python -m fused_segloss bench --quick          # tiny shapes: checks the tooling (CI)

Two sections. "loss" (loss.py) times forward+backward of the fused loss, a hand-written
TF CE + Dice (tf.function and XLA), the pure-TF reference and a bytes-moved floor,
interleaved in the same rounds, and measures each path's peak extra memory in a fresh
process (memory.py). "e2e" (e2e.py) times Keras `model.fit` steps of the demo U-Net with
SegLoss, the hand-written loss and a trivial loss, one process each, interleaved block by
block, and reports the loss's cost per step and each run's peak RSS. Compare ratios
within one run: absolute times on a shared machine drift.
"""
import argparse
import functools
import json
import os
import platform
import sys

SECTIONS = ("loss", "e2e")
# Full: loss rounds fill ~30 s (5 to 30); e2e: 2 warm-up steps, 6 rounds of 4-step blocks.
FULL = dict(batch=8, size=512, classes=5, e2e_batch=4, rounds=(5, 30), budget_s=30.0,
            warmup=2, e2e_rounds=6, block=4)
QUICK = dict(batch=2, size=32, classes=3, e2e_batch=2, rounds=(3, 3), budget_s=0.0,
             warmup=1, e2e_rounds=2, block=2)
MB = 1e6
log = functools.partial(print, file=sys.stderr, flush=True)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m fused_segloss bench",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="tiny shapes, few rounds and steps: a smoke run, not a speed test")
    p.add_argument("--batch", type=int, help="images per batch of the loss section (8)")
    p.add_argument("--e2e-batch", type=int, help="images per batch of the U-Net fit (4)")
    p.add_argument("--size", type=int, help="image height = width, a multiple of 16 (512)")
    p.add_argument("--classes", type=int, help="classes (5)")
    p.add_argument("--channels", default="channels_last",
                   choices=("channels_last", "channels_first"), help="data_format of logits")
    p.add_argument("--activation", default="sigmoid", choices=("sigmoid", "softmax"),
                   help="sigmoid: float32 0/1 labels; softmax: uint8 class ids")
    p.add_argument("--focal-gamma", type=float, default=0.0,
                   help="focal cross-entropy exponent (0: plain CE)")
    p.add_argument("--sections", default=",".join(SECTIONS),
                   help=f"comma-separated, from {','.join(SECTIONS)}")
    p.add_argument("--out", metavar="FILE.json", help="also write every number as JSON")
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.sections = [s.strip() for s in args.sections.split(",")]
    if set(args.sections) - set(SECTIONS):
        p.error(f"--sections: choose from {','.join(SECTIONS)}")
    if min(args.batch, args.e2e_batch, args.size, args.classes) < 1:
        p.error("--batch, --e2e-batch, --size and --classes must be >= 1")
    if "e2e" in args.sections and args.size % 16:
        p.error("--size must be a multiple of 16 for the U-Net's 4 poolings")
    return args


def machine():
    from importlib.metadata import version

    import tensorflow as tf

    import fused_segloss as fsl

    with open("/proc/cpuinfo") as f:
        cpus = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
    m = {"cpu": (cpus or [platform.processor() or "unknown CPU"])[0], "cores": os.cpu_count(),
         "usable_cores": len(os.sched_getaffinity(0)), "tensorflow": tf.__version__,
         "keras": version("keras"), "python": platform.python_version(),
         "compiled_library_loaded": fsl.fused_available(),
         "load_average_1min": os.getloadavg()[0]}  # other work inflates every time
    m["line"] = (f"machine: {m['cpu']}, {m['cores']} cores ({m['usable_cores']} usable), TF "
                 f"{m['tensorflow']}, Keras {m['keras']}, Python {m['python']}, compiled "
                 f"library loaded: {'yes' if m['compiled_library_loaded'] else 'NO'}, "
                 f"load average {m['load_average_1min']:.1f} at start")
    return m


def table(title, first, columns, rows):
    """columns: (header, format, key); rows: {label: dict}; "-" for a missing value, and
    the row's "note" after its cells."""
    lines = [title, f"{first:<32}" + "".join(f"{h:>{len(h) + 2}}" for h, _, _ in columns)]
    for label, r in rows.items():
        lines.append(f"{label:<32}" + "".join(
            f"{'-' if r.get(k) is None else format(r[k], f):>{len(h) + 2}}"
            for h, f, k in columns) + r.get("note", ""))
    return "\n".join(lines)


def main(argv=None):
    # Quiet TF logs unless the user chose a level: in the child processes (they inherit it),
    # and here if TF is not imported yet (`import fused_segloss` imports it).
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from . import e2e, loss, memory

    m = machine()
    print(m["line"], flush=True)
    result, tables = {"machine": m, "config": vars(args)}, []
    shape = loss.Shape(args.batch, args.size, args.classes, args.channels, args.activation,
                       args.focal_gamma)
    if "loss" in args.sections:
        log(f"loss section: timing every path in the same rounds, {shape}")
        rows, rounds = loss.measure(shape, args.rounds, args.budget_s,
                                    m["compiled_library_loaded"], log)
    # The e2e processes import, build and warm up while the memory probes run: nothing
    # is timed until every one of them is ready.
    e2e_shape = shape._replace(batch=args.e2e_batch)
    workers = e2e.start(e2e_shape, args.warmup) if "e2e" in args.sections else None
    if "loss" in args.sections:
        fused_ms = rows[loss.FUSED].get("median_ms")
        for label, r in rows.items():
            if "loss" in r:  # a loss path that ran (not the floor)
                log(f"loss section: peak memory of {label}, in a fresh process")
                r.update(memory.measure(label, shape))
                r["note"] = f"  memory probe failed: {r['error']}" if "error" in r else ""
            r["vs_fused"] = r["median_ms"] / fused_ms if fused_ms and "median_ms" in r else None
            r["peak_extra_mb"] = r["peak_extra_bytes"] / MB if "peak_extra_bytes" in r else None
        floor = rows[loss.FLOOR]
        losses = [r["loss"] for label, r in rows.items()
                  if "loss" in r and label != loss.FUSED_PLAIN]
        result["loss"] = {"shape": shape._asdict(), "rounds": rounds, "rows": rows,
                          "losses_agree": max(losses) - min(losses) < 1e-3 * max(losses)}
        tables.append(table(
            f"Loss, forward+backward (loss and dLoss/dlogits), {args.batch}x{args.size}x"
            f"{args.size}x{args.classes} {args.channels} float32 logits, {args.activation} ("
            f"{'uint8 class ids' if args.activation == 'softmax' else 'float32 labels'})"
            f"{f', focal_gamma={args.focal_gamma:g}' if args.focal_gamma else ''}: median of "
            f"{rounds} interleaved rounds", "path",
            [("time ms", ".2f", "median_ms"), ("x fused", ".2f", "vs_fused"),
             ("peak extra MB", ".1f", "peak_extra_mb"), ("x logits", ".2f", "x_logits")],
            rows) + f"\n(floor: a copy reading + writing {floor['bytes_moved'] / MB:.1f} MB, "
            f"the bytes the fused passes must move, at "
            f"{floor['bytes_moved'] / floor['median_ms'] / 1e6:.1f} GB/s)"
            + ("" if result["loss"]["losses_agree"] else f"\nWARNING: losses differ: {losses}"))
    if workers:
        log(f"e2e section: blocks of fit steps, one process per config, {e2e_shape}")
        rows = e2e.measure(workers, args.e2e_rounds, args.block)
        base = rows[e2e.TRIVIAL].get("step_ms")
        for r in rows.values():
            r["note"] = f"  failed: {r['error']}" if "error" in r else ""
            if base and "step_ms" in r:
                r["overhead_ms"] = r["step_ms"] - base
                r["overhead_pct"] = 100 * r["overhead_ms"] / base
            r["peak_rss_mb"] = r["peak_rss_bytes"] / MB if "peak_rss_bytes" in r else None
        jit = "/".join(sorted({str(r["jit_compile"]) for r in rows.values() if "jit_compile" in r}))
        result["e2e"] = {"shape": e2e_shape._asdict(), "warmup": args.warmup, "rows": rows}
        tables.append(table(
            f"End to end, Keras model.fit of the demo U-Net, batch {args.e2e_batch}, "
            f"{args.size}x{args.size}, {args.classes} classes, {args.activation}"
            f"{f' focal_gamma={args.focal_gamma:g}' if args.focal_gamma else ''}, "
            f"{args.channels}, jit_compile="
            f"{jit or '?'} (Keras default \"auto\": no XLA on CPU): median step after "
            f"{args.warmup} warm-up", "config",
            [("step ms", ".1f", "step_ms"), ("IQR ms", ".1f", "iqr_ms"), ("steps", "d", "steps"),
             ("loss overhead ms", ".1f", "overhead_ms"), ("% of trivial", ".1f", "overhead_pct"),
             ("peak RSS MB", ".0f", "peak_rss_mb")], rows))
    print("\n" + "\n\n".join(tables), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"\nwrote {args.out}")
    return 0
