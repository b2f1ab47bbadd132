"""Benchmark fused_segloss against the pure-TF reference and a hand-written TF BCE + Dice.

    python -m fused_segloss bench            # full run, ~5-10 min on 2 cores
    python -m fused_segloss bench --quick    # seconds-scale smoke run (CI)

One process times every path (forward, and forward+backward) on the same inputs, interleaved
round by round, with the memory-bandwidth floor measured in the same rounds; peak memory of
each path is measured in a fresh subprocess (_bench_memory.py). Prints tables and writes
bench.json, bench.png (log-log time vs size) and bench.txt (the tables) to --out-dir.
Compare ratios within one run: absolute times on a shared machine drift.
"""
import argparse
import json
import os
import platform
import sys
import time

from . import _bench_paths as bp

# Full run: at least 5 rounds per group. With 10 s per group, the slow eager reference
# (0.6-1.9 s per step) left 4 rounds for the 512² paths and 3 for the 1024² sweep, and the
# median of 4 on this machine moved by 20% between runs (min 13.2, median 16.2 ms).
_FULL = dict(batch=8, classes=5, size=512, sizes="64,128,256,512,1024", min_rounds=5,
             max_rounds=25, group_seconds=20.0, variant_seconds=4.0,
             variant_paths="fused,reference_xla", memory_paths=",".join(bp.PATHS),
             anatomy_steps=40, anatomy_sizes="256,512,1024")
_QUICK = dict(batch=2, classes=3, size=128, sizes="64,128", min_rounds=2, max_rounds=2,
              group_seconds=0.0, variant_seconds=0.0, variant_paths="fused",
              memory_paths="fused,reference", anatomy_steps=3, anatomy_sizes="32,64")
_CONDITION_STEPS = 20
SECTIONS = ("paths", "compare", "sweep", "variants", "memory", "anatomy")


def _csv(text, allowed=None, convert=str, name="value"):
    items = [convert(t.strip()) for t in text.split(",") if t.strip()]
    if allowed is not None:
        bad = [i for i in items if i not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {name} {bad}; choose from {list(allowed)}")
    return items


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m fused_segloss bench", description=__doc__.splitlines()[0],
        epilog=f"paths: {', '.join(bp.PATHS)}")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes and 2 rounds: checks the tooling, not the speed")
    parser.add_argument("--batch", type=int, help="images per batch (full: 8)")
    parser.add_argument("--classes", type=int, help="classes (full: 5)")
    parser.add_argument("--size", type=int, help="image side of the paths/variants sections (512)")
    parser.add_argument("--sizes", help="comma-separated image sides of the sweep (64,...,1024)")
    parser.add_argument("--paths", default=",".join(bp.PATHS),
                        help="paths of the paths and sweep sections (default: all)")
    parser.add_argument("--variant-paths",
                        help="paths timed on every variant (fused,reference_xla)")
    parser.add_argument("--memory-paths", help="paths whose peak memory is probed (default: all)")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"which of {','.join(SECTIONS)} to run")
    parser.add_argument("--min-rounds", type=int)
    parser.add_argument("--max-rounds", type=int)
    parser.add_argument("--group-seconds", type=float,
                        help="time budget per group for the timed rounds (between min and max)")
    parser.add_argument("--variant-seconds", type=float,
                        help="the same for each of the 24 variant groups (full: 4)")
    parser.add_argument("--anatomy-steps", type=int,
                        help="eager steps timed phase by phase in the anatomy section (40)")
    parser.add_argument("--anatomy-sizes",
                        help="image sides at which the anatomy section also times the step "
                             "back to back, after writing 256 MiB and after 0.2 s idle "
                             f"(256,512,1024; at most {_CONDITION_STEPS} steps each)")
    parser.add_argument("--out-dir", default="bench_out",
                        help="where bench.json, bench.png and bench.txt go (bench_out)")
    args = parser.parse_args(argv)
    for key, value in (_QUICK if args.quick else _FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    try:
        args.sizes = _csv(args.sizes, convert=int, name="size")
        args.paths = _csv(args.paths, bp.PATHS, name="path")
        args.variant_paths = _csv(args.variant_paths, bp.PATHS, name="path")
        args.memory_paths = _csv(args.memory_paths, bp.PATHS, name="path")
        args.sections = _csv(args.sections, SECTIONS, name="section")
        args.anatomy_sizes = _csv(args.anatomy_sizes, convert=int, name="size")
    except (argparse.ArgumentTypeError, ValueError) as exc:
        parser.error(str(exc))
    if min(args.sizes + args.anatomy_sizes +
           [args.size, args.batch, args.classes, args.anatomy_steps]) < 1:
        parser.error("sizes, batch, classes and anatomy steps must be >= 1")
    return args


def machine():
    """What the numbers were measured on."""
    import numpy as np
    import tensorflow as tf

    import fused_segloss
    from . import _loader

    info = {"python": platform.python_version(), "platform": platform.platform(),
            "logical_cpus": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0)),
            "tensorflow": tf.__version__, "numpy": np.__version__,
            "fused_segloss": fused_segloss.__version__,
            "library": repr(_loader.status()),
            "tf_intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads() or
            "default (all usable cpus)",
            "onednn_opts": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "default"),
            # other work on the machine while the bench ran inflates and scatters the times
            "load_average_1min_at_start": round(os.getloadavg()[0], 2)}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(ln.split(":", 1)[1].strip() for ln in f
                               if ln.startswith("model name"))
        with open("/proc/meminfo") as f:
            kib = int(next(ln.split()[1] for ln in f if ln.startswith("MemTotal")))
        info["memory_GiB"] = round(kib / 2**20, 1)
    except (OSError, StopIteration):
        pass
    return info


def _describe_machine(info):
    return (f"{info.get('cpu', '?')}, {info['usable_cpus']} CPUs, "
            f"{info.get('memory_GiB', '?')} GiB; "
            f"TF {info['tensorflow']}, Python {info['python']}")


def run(args, log=print):
    """Runs the selected sections; returns the JSON-ready result."""
    from . import _bench_anatomy, _bench_framework, _bench_memory, _bench_report as report
    from . import _bench_timing as timing, ops

    started = time.perf_counter()
    info = machine()
    base = bp.CaseShape(args.batch, args.size, args.classes)
    notes = []
    usable = list(bp.PATHS)
    if not ops.fused_available():
        usable = [p for p in usable if bp.PATHS[p].implementation != "fused"]
        notes.append("the op library is unavailable: fused rows are skipped, xla (auto) "
                     "measures the reference")
    paths = [p for p in args.paths if p in usable]
    rows, floors, sweep_floors, memory, anatomy = [], [], {}, [], None
    conditions, smallest = [], []

    def group(section, shape, entries, budget_s, skip_measured=True):
        todo = [e for e in entries if e.path in usable and not (
            skip_measured and report.find(rows, e.path, e.direction, e.shape or shape))]
        if not todo:
            return
        timed, floor = timing.time_group(shape, todo, args.min_rounds, args.max_rounds,
                                         budget_s, log=log)
        rows.extend(report.row(section, t, floor) for t in timed)
        floors.append(report.floor_row(shape, floor))
        if shape._replace(size=base.size) == base:
            sweep_floors[shape.size] = floor

    if "paths" in args.sections:
        log("paths:")
        group("paths", base, [timing.Entry(p, d) for p in paths for d in bp.DIRECTIONS],
              args.group_seconds)
    if "compare" in args.sections:
        # The layout and dtype targets compare fused times on different inputs; timed in one
        # group, their ratios come from the same rounds (not from groups minutes apart).
        log("compare (layout and dtype targets, same rounds):")
        group("compare", base, [timing.Entry("fused", "fwd_bwd", shape)
                                for shape in report.compare_shapes(base)],
              args.group_seconds, skip_measured=False)
    if "sweep" in args.sections:
        log("sweep:")
        for size in args.sizes:
            group("sweep", base._replace(size=size), [timing.Entry(p, "fwd_bwd") for p in paths],
                  args.group_seconds)
    if "variants" in args.sections:
        log("variants:")
        for shape in report.variant_shapes(base):
            entries = [timing.Entry("fused", d) for d in bp.DIRECTIONS
                       if "fused" in args.variant_paths]
            entries += [timing.Entry(p, "fwd_bwd") for p in args.variant_paths if p != "fused"]
            group("variants", shape, entries, args.variant_seconds)
    if "memory" in args.sections:
        log("memory (fresh process per path):")
        probes = [(p, "fwd_bwd") for p in args.memory_paths if p in usable]
        probes += [("fused", "fwd")] if "fused" in args.memory_paths and "fused" in usable else []
        for path, direction in probes:
            memory.append(_bench_memory.measure(path, direction, base))
            log(f"  {path} {direction}: " + (memory[-1].get("error") or
                f"{memory[-1]['peak_extra_bytes'] / 2**20:.1f} MB"))
    if "anatomy" in args.sections and "fused" in usable:
        log("anatomy (eager fused step, phase by phase):")
        anatomy = _bench_anatomy.measure(base, args.anatomy_steps)
        log("  under conditions: " + ", ".join(f"{s}²" for s in args.anatomy_sizes))
        conditions = _bench_anatomy.measure_conditions(
            [base._replace(size=s) for s in args.anatomy_sizes],
            min(args.anatomy_steps, _CONDITION_STEPS))
        log("  TensorFlow's smallest step under the same conditions")
        smallest = _bench_framework.measure(base.batch, base.classes,
                                            min(args.anatomy_steps, _CONDITION_STEPS))
    info["load_average_1min_at_end"] = round(os.getloadavg()[0], 2)
    report.add_ratios(rows)
    target_rows = report.targets(rows, memory, base, args.sizes)
    compare = next((p for p in args.variant_paths if p != "fused"), None)
    tables = [f"Machine: {_describe_machine(info)}; 1-min load average "
              f"{info['load_average_1min_at_start']} at the start, "
              f"{info['load_average_1min_at_end']} at the end",
              report.paths_table(rows, memory, base, paths),
              report.compare_table(rows, base),
              report.sweep_table(rows, base, args.sizes, paths, sweep_floors),
              report.variants_table(rows, base, compare),
              report.floors_table(floors),
              report.targets_table(target_rows, base)]
    if anatomy is not None:
        tables.append(_bench_anatomy.table(anatomy))
    if conditions:
        tables.append(_bench_anatomy.conditions_table(conditions))
    if smallest:
        tables.append(_bench_framework.table(smallest, conditions, base.batch, base.classes))
    tables += [f"Note: {n}" for n in notes]
    bad_memory = [m for m in memory if "error" in m]
    if bad_memory:
        tables.append("Memory probes that failed: " + "; ".join(
            f"{m['path']} {m['direction']}: {m['error']}" for m in bad_memory))
    return {"machine": info, "config": {k: v for k, v in vars(args).items()},
            "base_shape": base._asdict(), "rows": rows, "floors": floors, "memory": memory,
            "targets": target_rows, "notes": notes,
            "anatomy": anatomy and _bench_anatomy.as_json(anatomy),
            "anatomy_conditions": [{"size": c.anatomy.shape.size, "condition": c.condition,
                                    **_bench_anatomy.as_json(c.anatomy)} for c in conditions],
            "framework_smallest_steps": _bench_framework.as_json(smallest),
            "framework_spread_estimates": _bench_framework.spread_estimates(conditions, smallest),
            "wall_seconds": time.perf_counter() - started}, "\n\n".join(tables), sweep_floors


def main(argv=None):
    args = parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from . import _bench_report as report

    result, text, sweep_floors = run(args, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    print(text, flush=True)
    os.makedirs(args.out_dir, exist_ok=True)
    json_path = os.path.join(args.out_dir, "bench.json")
    with open(json_path, "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(args.out_dir, "bench.txt"), "w") as f:
        f.write(text + "\n")
    png_path = os.path.join(args.out_dir, "bench.png")
    base = bp.CaseShape(**result["base_shape"])
    report.plot(result["rows"], base, args.sizes, args.paths, sweep_floors, png_path,
                "fused_segloss forward+backward vs size — "
                + _describe_machine(result["machine"]))
    print(f"\nwrote {json_path}, {png_path} ({result['wall_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
