"""Turns timed groups and memory probes into JSON rows, text tables, target checks and a plot."""
import math

from . import _bench_paths as bp

MB = 1024 * 1024


def row(section, timed, floor):
    """One JSON row: a path's timing on one shape, with the floor of its group."""
    shape = timed.shape
    nbytes = bp.min_bytes_moved(shape, timed.direction)
    floor_s = floor.seconds_for(nbytes)
    return {"section": section, "path": timed.path, "label": timed.label,
            "direction": timed.direction, **shape._asdict(), "elements": shape.elements,
            "logits_bytes": bp.logits_bytes(shape), "bytes_min": nbytes,
            "median_ms": timed.median_s * 1e3, "min_ms": timed.min_s * 1e3,
            "rounds": timed.rounds, "first_call_ms": timed.first_call_s * 1e3,
            "floor_ms": floor_s * 1e3, "x_floor": timed.median_s / floor_s,
            "custom_calls": timed.custom_calls}


def floor_row(shape, floor):
    return {"shape": shape.describe(), "elements": floor.elements,
            "copy_bytes": floor.copy_bytes, "bandwidth_GBps": floor.bandwidth / 1e9,
            "numpy_1thread_ms": floor.numpy_1thread_s * 1e3,  # fastest round
            "numpy_2threads_ms": floor.numpy_2threads_s * 1e3,
            "tf_new_tensor_ms": floor.tf_new_tensor_s * 1e3,
            "tf_new_tensor_GBps": floor.copy_bytes / floor.tf_new_tensor_s / 1e9}


def _shape_of(r):
    return bp.CaseShape(*(r[f] for f in bp.CaseShape._fields))


def find(rows, path, direction, shape, section=None):
    """The first row of that path, direction and shape (in that section, if given)."""
    for r in rows:
        if (r["path"] == path and r["direction"] == direction and _shape_of(r) == shape
                and section in (None, r.get("section"))):
            return r
    return None


def compare_shapes(base):
    """The inputs of the layout and dtype targets: base, channels_first, bf16 + uint8."""
    return [base, base._replace(layout="channels_first"),
            base._replace(logits_dtype="bfloat16", labels_dtype="uint8")]


def add_ratios(rows):
    """vs_fused: the row's median over fused (eager)'s median on the same shape and direction."""
    for r in rows:
        fused = find(rows, "fused", r["direction"], _shape_of(r))
        r["vs_fused"] = r["median_ms"] / fused["median_ms"] if fused else None


def _fmt(value, spec=".1f", none="-"):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return none
    return format(value, spec)


def _memory_for(memory, path, direction, shape):
    for m in memory:
        if ("error" not in m and m["path"] == path and m["direction"] == direction
                and _shape_of(m) == shape):
            return m
    return None


def paths_table(rows, memory, shape, paths):
    lines = [f"Paths, {shape.describe()}: median ms (x floor = time / time to move the "
             f"minimum bytes at the measured copy bandwidth; vs fused = time / fused eager time)",
             f"{'path':<34}{'fwd ms':>9}{'x floor':>9}{'fwd+bwd ms':>12}{'x floor':>9}"
             f"{'vs fused':>10}{'peak MB':>9}{'x logits':>10}"]
    for path in paths:
        fwd, both = find(rows, path, "fwd", shape), find(rows, path, "fwd_bwd", shape)
        if not (fwd or both):
            continue
        mem = _memory_for(memory, path, "fwd_bwd", shape)
        label = (both or fwd)["label"]
        lines.append(
            f"{label:<34}{_fmt(fwd and fwd['median_ms']):>9}{_fmt(fwd and fwd['x_floor']):>9}"
            f"{_fmt(both and both['median_ms']):>12}{_fmt(both and both['x_floor']):>9}"
            f"{_fmt(both and both['vs_fused'], '.2f'):>10}"
            f"{_fmt(mem and mem['peak_extra_bytes'] / MB, '.1f'):>9}"
            f"{_fmt(mem and mem['x_logits'], '.2f'):>10}")
    return "\n".join(lines)


def sweep_table(rows, base, sizes, paths, floors_by_size):
    head = f"{'path':<34}" + "".join(f"{str(s) + '²':>10}" for s in sizes)
    lines = [f"Size sweep, forward+backward, {base.batch} images x {base.classes} classes, "
             f"{base.logits_dtype} logits, {base.labels_dtype} labels: median ms", head]
    for path in paths:
        cells = [find(rows, path, "fwd_bwd", base._replace(size=s)) for s in sizes]
        if any(cells):
            label = next(c for c in cells if c)["label"]
            lines.append(f"{label:<34}" + "".join(
                f"{_fmt(c and c['median_ms'], '.2f'):>10}" for c in cells))
    floor_ms = []
    for s in sizes:
        floor = floors_by_size.get(s)
        floor_ms.append(floor.seconds_for(bp.min_bytes_moved(base._replace(size=s), "fwd_bwd"))
                        * 1e3 if floor else None)
    lines.append(f"{'floor (min bytes / copy bandwidth)':<34}"
                 + "".join(f"{_fmt(v, '.2f'):>10}" for v in floor_ms))
    fused = [find(rows, "fused", "fwd_bwd", base._replace(size=s)) for s in sizes]
    lines.append(f"{'fused ns per element':<34}" + "".join(
        f"{_fmt(c and c['median_ms'] * 1e6 / c['elements'], '.2f'):>10}" for c in fused))
    return "\n".join(lines)


def variant_shapes(base):
    return [base._replace(layout=layout, logits_dtype=xd, labels_dtype=zd, weights=w)
            for layout in bp.LAYOUTS for xd in bp.LOGIT_DTYPES for zd in bp.LABEL_DTYPES
            for w in (False, True)]


def variants_table(rows, base, compare_path):
    lines = [f"Variants, {base.batch}x{base.size}x{base.size}x{base.classes}: fused (eager) "
             f"median ms; 'vs f32' = fwd+bwd time / that of float32 logits and labels, "
             f"channels_last, no weights; last columns: {compare_path or 'no other path'} "
             f"fwd+bwd and its time / fused",
             f"{'layout':<15}{'logits':<9}{'labels':<8}{'weights':<8}{'fwd ms':>8}"
             f"{'fwd+bwd ms':>11}{'x floor':>9}{'vs f32':>8}{'other ms':>10}{'/ fused':>9}"]
    plain = find(rows, "fused", "fwd_bwd", base)
    for shape in variant_shapes(base):
        fwd, both = find(rows, "fused", "fwd", shape), find(rows, "fused", "fwd_bwd", shape)
        other = find(rows, compare_path, "fwd_bwd", shape) if compare_path else None
        if not (fwd or both):
            continue
        lines.append(
            f"{shape.layout:<15}{shape.logits_dtype:<9}{shape.labels_dtype:<8}"
            f"{'yes' if shape.weights else 'no':<8}{_fmt(fwd and fwd['median_ms'], '.2f'):>8}"
            f"{_fmt(both and both['median_ms'], '.2f'):>11}{_fmt(both and both['x_floor']):>9}"
            f"{_fmt(both and plain and both['median_ms'] / plain['median_ms'], '.2f'):>8}"
            f"{_fmt(other and other['median_ms'], '.1f'):>10}"
            f"{_fmt(other and both and other['median_ms'] / both['median_ms'], '.1f'):>9}")
    return "\n".join(lines)


def compare_table(rows, base):
    """The fused fwd+bwd times of the layout and dtype targets, timed in the same rounds."""
    lines = [f"Layout and dtype, {base.batch}x{base.size}x{base.size}x{base.classes}, fused "
             f"(eager) forward+backward timed in the same rounds: median ms and time / the "
             f"first row's",
             f"{'layout':<15}{'logits':<9}{'labels':<8}{'fwd+bwd ms':>11}{'x floor':>9}"
             f"{'vs first':>9}"]
    first = find(rows, "fused", "fwd_bwd", base, "compare")
    for shape in compare_shapes(base):
        r = find(rows, "fused", "fwd_bwd", shape, "compare")
        if r is None:
            continue
        lines.append(f"{shape.layout:<15}{shape.logits_dtype:<9}{shape.labels_dtype:<8}"
                     f"{r['median_ms']:>11.2f}{r['x_floor']:>9.1f}"
                     f"{_fmt(first and r['median_ms'] / first['median_ms'], '.2f'):>9}")
    return "\n".join(lines)


def floors_table(floor_rows):
    lines = ["Memory-bandwidth floor, measured in the same rounds as each group (fastest copy "
             "of the rounds, ms; GB/s counts bytes read + written)",
             f"{'group':<66}{'np 1 thr':>9}{'np 2 thr':>9}{'GB/s':>7}{'tf new':>8}{'GB/s':>7}"]
    for f in floor_rows:
        lines.append(f"{f['shape']:<66}{f['numpy_1thread_ms']:>9.2f}{f['numpy_2threads_ms']:>9.2f}"
                     f"{f['bandwidth_GBps']:>7.1f}{f['tf_new_tensor_ms']:>8.2f}"
                     f"{f['tf_new_tensor_GBps']:>7.1f}")
    return "\n".join(lines)


def _sweep_points(rows, base, sizes):
    """(elements, median ms) of fused fwd+bwd at each measured sweep size >= 256."""
    return [(r["elements"], r["median_ms"]) for s in sizes if s >= 256
            for r in [find(rows, "fused", "fwd_bwd", base._replace(size=s))] if r]


def linearity(rows, base, sizes):
    """max / min of fused fwd+bwd time per element over the sweep sizes >= 256."""
    per_element = [t / n for n, t in _sweep_points(rows, base, sizes)]
    return max(per_element) / min(per_element) if len(per_element) >= 2 else None


def marginal_linearity(rows, base, sizes):
    """max / min of the added time per added element between consecutive sweep sizes >= 256:
    (t2 - t1) / (n2 - n1). A fixed per-step cost (dispatch, tape, thread wake-up) cancels
    here and not in `linearity`, so the two together separate "the passes grow linearly"
    from "the step has a fixed cost" (context: the issue's target is `linearity`)."""
    points = _sweep_points(rows, base, sizes)
    slopes = [(t2 - t1) / (n2 - n1) for (n1, t1), (n2, t2) in zip(points, points[1:])
              if n2 > n1]
    if len(slopes) < 2 or min(slopes) <= 0:  # fewer than three sizes, or noise inverted one
        return None
    return max(slopes) / min(slopes)


def targets(rows, memory, base, sizes):
    """Issue 2/6 targets with the measured value of each (None: not measured in this run)."""
    def med(path, shape, direction="fwd_bwd"):
        r = find(rows, path, direction, shape)
        return r["median_ms"] if r else None

    def ratio(a, b):
        return a / b if a is not None and b else None

    def fused_ratio(shape):
        """fused time on `shape` / on base: from the compare section (same rounds) when it
        ran, else from the separate groups."""
        same_rounds = [find(rows, "fused", "fwd_bwd", s, "compare") for s in (shape, base)]
        if all(same_rounds):
            return same_rounds[0]["median_ms"] / same_rounds[1]["median_ms"]
        return ratio(med("fused", shape), fused)

    fused = med("fused", base)
    floor_row_ = find(rows, "fused", "fwd_bwd", base)
    mem = _memory_for(memory, "fused", "fwd_bwd", base)
    _, first, small = compare_shapes(base)
    checks = [
        ("fused fwd+bwd / floor", floor_row_ and floor_row_["x_floor"], "<=", 1.5),
        ("reference XLA / fused", ratio(med("reference_xla", base), fused), ">=", 6.0),
        ("reference XLA / fused (issue 2)", ratio(med("reference_xla", base), fused), ">=", 3.0),
        ("reference tf.function / fused", ratio(med("reference_function", base), fused),
         ">=", 14.0),
        ("fused peak extra / logits", mem and mem["x_logits"], "<=", 1.5),
        ("fused time/element spread 256²-1024²", linearity(rows, base, sizes), "<=", 1.15),
        ("channels_first / channels_last", fused_ratio(first), "<=", 1.2),
        ("bf16+uint8 / f32+f32", fused_ratio(small), "<", 1.0),
    ]
    # Context, not targets: the same bounds with the fused path in the reference's own mode
    # (the targets above use fused eager, the slowest fused mode). The XLA row counts only
    # when its HLO holds the custom call (else it times the reference fallback).
    xla = find(rows, "xla_auto", "fwd_bwd", base)
    xla = xla if xla and "custom call" in xla.get("label", "") else None
    xla_ms = xla and xla["median_ms"]
    context = [
        ("same mode: xla custom call / floor", xla and xla.get("x_floor"), "<=", 1.5),
        ("same mode: ref. XLA / xla custom call", ratio(med("reference_xla", base), xla_ms),
         ">=", 6.0),
        ("same mode: ref. tf.fn / fused tf.fn",
         ratio(med("reference_function", base), med("fused_function", base)), ">=", 14.0),
        ("added time/element spread 256²-1024²", marginal_linearity(rows, base, sizes), "<=",
         1.15),
    ]
    out = []
    for kind, entries in (("target", checks), ("context", context)):
        for name, value, op, bound in entries:
            met = None if value is None else (value <= bound if op == "<=" else
                                              value >= bound if op == ">=" else value < bound)
            out.append({"target": name, "value": value, "op": op, "bound": bound, "met": met,
                        "kind": kind})
    return out


def targets_table(target_rows, base):
    lines = [f"Targets at {base.describe()} (fused = fused eager, forward+backward; the "
             f"layout and dtype ratios from the same rounds when the compare section ran)"]
    for t in target_rows:
        verdict = {True: "met", False: "NOT met", None: "not measured"}[t["met"]]
        if t.get("kind") == "context":
            verdict = {True: "would be met", False: "would not be met",
                       None: "not measured"}[t["met"]] + " (context, not a target)"
        lines.append(f"  {t['target']:<40}{_fmt(t['value'], '.2f'):>8}  "
                     f"(target {t['op']} {t['bound']:g})  {verdict}")
    return "\n".join(lines)


def plot(rows, base, sizes, paths, floors_by_size, png_path, title):
    """Log-log time vs image side for each path (forward+backward), with the floor."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5.5), dpi=110)
    for path in paths:
        pts = [(s, r["median_ms"], r["label"]) for s in sizes
               for r in [find(rows, path, "fwd_bwd", base._replace(size=s))] if r]
        if pts:
            style = "-o" if bp.PATHS[path].family == "fused" else "--s"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=pts[0][2], ms=4)
    floor_pts = [(s, floors_by_size[s].seconds_for(
        bp.min_bytes_moved(base._replace(size=s), "fwd_bwd")) * 1e3)
        for s in sizes if s in floors_by_size]
    if floor_pts:
        ax.plot([p[0] for p in floor_pts], [p[1] for p in floor_pts], "k:",
                label="memory floor (min bytes / copy bandwidth)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(sizes)
    ax.set_xticklabels([f"{s}²" for s in sizes])
    ax.set_xlabel(f"image size (batch {base.batch}, {base.classes} classes, {base.layout})")
    ax.set_ylabel("forward+backward time, ms (median)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # nothing to plot when the sweep did not run
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside the data
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
