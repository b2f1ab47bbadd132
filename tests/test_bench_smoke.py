"""The benchmark tooling runs end to end and its outputs are well-formed (no timing assertions:
CI machines are noisy; the tools are kept from rotting, the numbers come from a full run)."""
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

import fused_segloss
from fused_segloss import _bench_anatomy
from fused_segloss import _bench_paths as bp
from fused_segloss import _bench_report as report
from fused_segloss import bench

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
needs_library = pytest.mark.skipif(not fused_segloss.fused_available(),
                                   reason="the op library is not built")


def _run(args, env_extra=None, timeout=600):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", **(env_extra or {}))
    done = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, f"{args} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


# ---- pure functions -------------------------------------------------------------------------

def test_min_bytes_moved_counts_reads_and_the_gradient_write():
    shape = bp.CaseShape(2, 4, 3)  # 96 elements, 32 pixels
    # float32 logits + labels: forward reads 4 + 4 B; backward reads them again, writes 4 B.
    assert bp.min_bytes_moved(shape, "fwd") == 96 * 8
    assert bp.min_bytes_moved(shape, "fwd_bwd") == 96 * 20
    small = shape._replace(logits_dtype="bfloat16", labels_dtype="uint8", weights=True)
    # 2 + 1 B per element and a float32 weight per pixel, read twice; a 2 B gradient written.
    assert bp.min_bytes_moved(small, "fwd_bwd") == 2 * (96 * 3 + 32 * 4) + 96 * 2
    with pytest.raises(ValueError, match="direction"):
        bp.min_bytes_moved(shape, "backward")


def test_custom_call_detection_from_hlo_text():
    hlo = ('%a = f32[2,8]{1,0} custom-call(f32[4]{0} %x), '
           'custom_call_target="fused_segloss_stats"\n'
           '%b = f32[4]{0} custom-call(%a), custom_call_target="other", api_version=4\n'
           '%c = f32[4]{0} custom-call(%a), custom_call_target="fused_segloss_stats"\n')
    assert bp.custom_call_targets(hlo) == ["fused_segloss_stats", "other"]
    auto = bp.PATHS["xla_auto"]
    assert bp.xla_label(auto, ["fused_segloss_stats"]) == "xla (custom call)"
    assert bp.xla_label(auto, ["other"]) == "xla (reference fallback)"
    assert bp.xla_label(auto, []) == "xla (reference fallback)"
    assert "not inspectable" in bp.xla_label(auto, None)
    assert bp.xla_label(bp.PATHS["reference_xla"], []) == bp.PATHS["reference_xla"].label


@pytest.mark.parametrize("layout", bp.LAYOUTS)
@pytest.mark.parametrize("weights", [False, True])
def test_plain_baseline_computes_the_same_loss_as_seg_loss(layout, weights):
    # The hand-written BCE + Dice baseline is only a fair comparison if it computes seg_loss's
    # default loss; the reference path is the oracle here (float32 both: 1e-5 relative).
    shape = bp.CaseShape(2, 8, 3, layout, weights=weights)
    x, z, w = bp.make_inputs(shape)
    plain = bp.plain_bce_dice(x, z, w, data_format=layout)
    ref = fused_segloss.seg_loss(x, z, w, data_format=layout, implementation="reference")
    np.testing.assert_allclose(plain.numpy(), ref.numpy(), rtol=1e-5)


def _rows(times, size=512, **shape_changes):
    base = bp.CaseShape(8, size, 5)._replace(**shape_changes)
    return [{"path": p, "direction": "fwd_bwd", **base._asdict(), "elements": base.elements,
             "median_ms": t, "x_floor": t / 10.0} for p, t in times.items()]


def test_targets_compare_the_right_rows():
    base = bp.CaseShape(8, 512, 5)
    rows = (_rows({"fused": 10.0, "reference_xla": 70.0, "reference_function": 100.0})
            + _rows({"fused": 11.0}, layout="channels_first")
            + _rows({"fused": 8.0}, logits_dtype="bfloat16", labels_dtype="uint8")
            + _rows({"fused": 2.5}, size=256) + _rows({"fused": 40.0 * 1.2}, size=1024))
    memory = [{**base._asdict(), "path": "fused", "direction": "fwd_bwd", "x_logits": 1.25}]
    found = {t["target"]: (t["value"], t["met"])
             for t in report.targets(rows, memory, base, [256, 512, 1024])}
    assert found["fused fwd+bwd / floor"] == (1.0, True)
    assert found["reference XLA / fused"] == (7.0, True)
    assert found["reference tf.function / fused"] == (10.0, False)
    assert found["fused peak extra / logits"] == (1.25, True)
    assert found["channels_first / channels_last"] == (pytest.approx(1.1), True)
    assert found["bf16+uint8 / f32+f32"] == (pytest.approx(0.8), True)
    # per element (N = 8*256²*5): 256² 2.5/N, 512² 10/4N = 2.5/N, 1024² 48/16N = 3/N -> 1.2
    assert found["fused time/element spread 256²-1024²"] == (pytest.approx(1.2), False)
    # added per element: 256²->512² 7.5/3N = 2.5/N, 512²->1024² 38/12N = 3.17/N -> 1.267
    assert found["added time/element spread 256²-1024²"] == (pytest.approx(38 / 30), False)
    # the same-mode context rows: none measured here (no xla_auto / fused_function rows)
    assert found["same mode: ref. XLA / xla custom call"] == (None, None)
    rows += [dict(r, label="xla (custom call)") for r in _rows({"xla_auto": 5.0})]
    rows += _rows({"fused_function": 8.0})
    found = {t["target"]: (t["value"], t["met"], t["kind"])
             for t in report.targets(rows, memory, base, [256, 512, 1024])}
    assert found["same mode: ref. XLA / xla custom call"] == (14.0, True, "context")
    assert found["same mode: xla custom call / floor"] == (0.5, True, "context")
    assert found["same mode: ref. tf.fn / fused tf.fn"] == (12.5, False, "context")
    assert found["reference XLA / fused"] == (7.0, True, "target")
    fallback = [dict(r, label="xla (reference fallback)") if r["path"] == "xla_auto" else r
                for r in rows]
    found = {t["target"]: t["value"]
             for t in report.targets(fallback, memory, base, [256, 512, 1024])}
    assert found["same mode: ref. XLA / xla custom call"] is None


def test_added_time_spread_cancels_a_fixed_cost_and_needs_three_sizes():
    base = bp.CaseShape(8, 512, 5)
    elements = {s: 8 * s * s * 5 for s in (256, 512, 1024)}
    # 2 ms fixed + 1 ns per element: the per-element spread is large, the added one exactly 1
    rows = [r for s, n in elements.items() for r in _rows({"fused": 2.0 + n * 1e-6}, size=s)]
    found = {t["target"]: (t["value"], t["met"], t["kind"])
             for t in report.targets(rows, [], base, [256, 512, 1024])}
    assert found["added time/element spread 256²-1024²"] == (pytest.approx(1.0), True,
                                                              "context")
    assert found["fused time/element spread 256²-1024²"][0] > 1.5
    assert report.marginal_linearity(rows, base, [256, 512]) is None  # one slope only
    shrinking = [r for s in (256, 512, 1024) for r in _rows({"fused": 5.0}, size=s)]
    assert report.marginal_linearity(shrinking, base, [256, 512, 1024]) is None


def test_layout_and_dtype_targets_prefer_times_from_the_same_rounds():
    base = bp.CaseShape(8, 512, 5)
    first = base._replace(layout="channels_first")
    small = base._replace(logits_dtype="bfloat16", labels_dtype="uint8")
    separate = (_rows({"fused": 10.0}) + _rows({"fused": 13.0}, layout="channels_first")
                + _rows({"fused": 12.0}, logits_dtype="bfloat16", labels_dtype="uint8"))
    found = {t["target"]: t["value"] for t in report.targets(separate, [], base, [512])}
    assert found["channels_first / channels_last"] == pytest.approx(1.3)
    assert found["bf16+uint8 / f32+f32"] == pytest.approx(1.2)
    same_rounds = [dict(r, section="compare") for r in
                   _rows({"fused": 20.0}) + _rows({"fused": 22.0}, layout="channels_first")
                   + _rows({"fused": 18.0}, logits_dtype="bfloat16", labels_dtype="uint8")]
    found = {t["target"]: t["value"]
             for t in report.targets(separate + same_rounds, [], base, [512])}
    assert found["channels_first / channels_last"] == pytest.approx(1.1)
    assert found["bf16+uint8 / f32+f32"] == pytest.approx(0.9)
    # the other targets keep using the paths rows (the first found)
    assert report.find(separate + same_rounds, "fused", "fwd_bwd", base)["median_ms"] == 10.0
    assert report.find(separate + same_rounds, "fused", "fwd_bwd", first,
                       "compare")["median_ms"] == 22.0
    assert report.compare_shapes(base) == [base, first, small]


def test_bench_rejects_unknown_names():
    with pytest.raises(SystemExit):
        bench.parse_args(["--paths", "fused,nonsense"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--sections", "speed"])


# ---- end to end -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    stdout = _run(["-m", "fused_segloss.bench", "--quick", "--out-dir", str(out)])
    with open(out / "bench.json") as f:
        return stdout, json.load(f), out


@needs_library
def test_quick_bench_prints_every_table(quick_run):
    stdout, result, _ = quick_run
    for heading in ("Paths, 2x128x128x3", "Layout and dtype, 2x128x128x3", "Size sweep",
                    "Variants", "Memory-bandwidth floor", "Targets at", "Anatomy of one eager",
                    "Anatomy under conditions", "TensorFlow's smallest step"):
        assert heading in stdout
    for spec in bp.PATHS.values():
        if spec.name != "xla_auto":
            assert spec.label in stdout
    assert "xla (custom call)" in stdout or "xla (reference fallback)" in stdout


@needs_library
def test_quick_bench_json_is_complete_and_consistent(quick_run):
    stdout, result, _ = quick_run
    rows = result["rows"]
    base = bp.CaseShape(**result["base_shape"])
    measured = {(r["path"], r["direction"]) for r in rows
                if bp.CaseShape(*(r[f] for f in bp.CaseShape._fields)) == base}
    assert measured == {(p, d) for p in bp.PATHS for d in bp.DIRECTIONS}
    variants = {(r["layout"], r["logits_dtype"], r["labels_dtype"], r["weights"])
                for r in rows if r["path"] == "fused" and r["direction"] == "fwd_bwd"
                and r["size"] == base.size}
    assert len(variants) == 2 * 3 * 2 * 2
    assert {r["size"] for r in rows if r["path"] == "reference_xla"} == {64, 128}
    compared = [bp.CaseShape(*(r[f] for f in bp.CaseShape._fields)) for r in rows
                if r["section"] == "compare"]
    assert compared == report.compare_shapes(base)
    for r in rows:
        assert r["median_ms"] > 0 and r["min_ms"] <= r["median_ms"]
        assert r["bytes_min"] == bp.min_bytes_moved(
            bp.CaseShape(*(r[f] for f in bp.CaseShape._fields)), r["direction"])
        assert math.isclose(r["x_floor"], r["median_ms"] / r["floor_ms"])
        fused = report.find(rows, "fused", r["direction"],
                            bp.CaseShape(*(r[f] for f in bp.CaseShape._fields)))
        assert math.isclose(r["vs_fused"], r["median_ms"] / fused["median_ms"])
    assert all(f["bandwidth_GBps"] > 0 for f in result["floors"])
    assert {t["target"] for t in result["targets"]} >= {"fused fwd+bwd / floor",
                                                         "reference XLA / fused"}
    assert set(result["anatomy"]["intervals_ms"]) == {n for n, _ in _bench_anatomy.INTERVALS}
    names = ["back to back", "after writing 256 MiB", "after 0.2 s idle"]
    conditions = result["anatomy_conditions"]  # --quick: 32² and 64², three conditions each
    assert [(c["size"], c["condition"]) for c in conditions] == [
        (size, name) for size in (32, 64) for name in names]
    for c in conditions:
        assert set(c["intervals_ms"]) == {n for n, _ in _bench_anatomy.INTERVALS}
        assert c["step_ms"] >= max(c["intervals_ms"].values()) > 0
        assert 0 < c["outside_ms"] < c["step_ms"]
    spread_line = next(ln for ln in stdout.splitlines() if ln.startswith("time/element spread"))
    for name in names:  # each condition's spread is max/min of its own steps' ns per element
        per_element = [c["step_ms"] * 1e6 / (base.batch * c["size"] ** 2 * base.classes)
                       for c in conditions if c["condition"] == name]
        assert f"{name} {max(per_element) / min(per_element):.2f}" in spread_line
    smallest = result["framework_smallest_steps"]  # every mode under the same conditions
    assert [(s["mode"], s["condition"]) for s in smallest] == [
        (mode, name) for mode in ("eager", "tf.function", "XLA") for name in names]
    assert all(s["median_ms"] > 0 for s in smallest)
    assert set(result["framework_spread_estimates"]) == set(names)
    assert all(e > 1 for e in result["framework_spread_estimates"].values())
    xla_auto = [r for r in rows if r["path"] == "xla_auto"]
    for r in xla_auto:  # the label follows the HLO's custom calls
        has_call = any("segloss" in t for t in r["custom_calls"])
        assert r["label"] == ("xla (custom call)" if has_call else "xla (reference fallback)")


@needs_library
def test_quick_bench_memory_probe_measures_real_allocations(quick_run):
    _, result, _ = quick_run
    probes = {(m["path"], m["direction"]): m for m in result["memory"]}
    assert set(probes) == {("fused", "fwd_bwd"), ("reference", "fwd_bwd"), ("fused", "fwd")}
    for m in probes.values():
        assert "error" not in m, m
    # fwd+bwd keeps the gradient (the logits' size) alive, so at least ~1x must be seen; the
    # reference materialises several logits-sized temporaries (sigmoid, softplus, products).
    assert probes[("fused", "fwd_bwd")]["x_logits"] >= 0.9
    assert probes[("reference", "fwd_bwd")]["x_logits"] > 2.0
    assert probes[("fused", "fwd")]["x_logits"] < probes[("fused", "fwd_bwd")]["x_logits"]


@needs_library
def test_quick_bench_writes_a_png_plot(quick_run):
    import matplotlib.image

    _, _, out = quick_run
    with open(out / "bench.png", "rb") as f:
        assert f.read(8) == PNG_SIGNATURE
    pixels = matplotlib.image.imread(str(out / "bench.png"))
    assert pixels.ndim == 3 and pixels.shape[0] > 200 and pixels.shape[1] > 200
    assert pixels.std() > 0.01  # not a blank canvas
    assert (out / "bench.txt").read_text().startswith("Machine:")


def test_bench_is_wired_into_the_package_cli():
    stdout = _run(["-m", "fused_segloss", "bench", "--help"])
    assert "--quick" in stdout and "--out-dir" in stdout


@needs_library
def test_pytest_benchmark_suite_runs_small(tmp_path):
    json_path = tmp_path / "pb.json"
    stdout = _run(["-m", "pytest", "benchmarks", "-q",
                   "--benchmark-min-rounds=2", "--benchmark-max-time=0.02",
                   "--benchmark-warmup=off", f"--benchmark-json={json_path}"],
                  env_extra={"FSL_BENCH_SIZE": "16"})
    assert "fused_segloss benchmark ratios" in stdout
    assert "seg_loss fwd+bwd 8x16x16x5 float32" in stdout
    data = json.loads(json_path.read_text())
    groups = {b["group"] for b in data["benchmarks"]}
    assert groups == {"seg_loss fwd+bwd 8x16x16x5 float32",
                      "seg_loss forward only 8x16x16x5 float32",
                      "fused seg_loss fwd+bwd variants 8x16x16x5"}
    assert all(b["stats"]["rounds"] >= 2 for b in data["benchmarks"])


@needs_library
def test_anatomy_times_every_phase_of_the_eager_step_and_unpatches():
    from fused_segloss import _eager_fused, ops

    library, jacobian = ops.library, _eager_fused._Traced.combine_with_jacobian
    anatomy = _bench_anatomy.measure(bp.CaseShape(2, 16, 3), steps=3, warmup=1)
    assert [name for name, _ in anatomy.intervals_ms] == [n for n, _ in _bench_anatomy.INTERVALS]
    assert all(ms > 0 for _, ms in anatomy.intervals_ms)
    assert anatomy.step_ms >= max(ms for _, ms in anatomy.intervals_ms)
    assert ops.library is library and _eager_fused._Traced.combine_with_jacobian is jacobian
    assert "outside the two ops" in _bench_anatomy.table(anatomy)


@needs_library
def test_anatomy_conditions_run_their_action_before_every_step():
    calls = []
    shape = bp.CaseShape(2, 16, 3)
    anatomy = _bench_anatomy.measure(shape, steps=3, warmup=1,
                                     before_step=lambda: calls.append(time.perf_counter()))
    assert len(calls) == 4 and anatomy.steps == 3
    results = _bench_anatomy.measure_conditions([shape], steps=2, write_mib=1, idle_s=0.01)
    assert [r.condition for r in results] == ["back to back", "after writing 1 MiB",
                                              "after 0.01 s idle"]
    assert all(r.anatomy.shape == shape and r.anatomy.steps == 2 for r in results)
    table = _bench_anatomy.conditions_table(results).splitlines()
    assert len(table) == 2 + len(results)
    for line, r in zip(table[2:], results):
        assert r.condition in line
        # last column: the step's ns per element, from its own median and element count
        assert float(line.split()[-1]) == pytest.approx(
            r.anatomy.step_ms * 1e6 / shape.elements, abs=1e-3)


def test_anatomy_conditions_do_what_they_are_named_for():
    (back, none), (write, copy), (idle, sleep) = _bench_anatomy.conditions(write_mib=2,
                                                                           idle_s=0.02)
    assert back == "back to back" and none is None and "2 MiB" in write and "0.02 s" in idle
    start = time.perf_counter()
    sleep()
    assert time.perf_counter() - start >= 0.02  # sleep never returns early
    assert copy.target.nbytes == 2 << 20 and not copy.target.any()
    copy()
    np.testing.assert_array_equal(copy.target, copy.source)
    assert copy.source.all()


@needs_library
def test_label_bytes_ab_alternates_the_setting_and_restores_it(monkeypatch, capsys):
    """benchmarks/label_bytes_ab.py: the 'on' blocks run the label-bytes ops, the 'off'
    blocks the plain ones, in alternating order, and the setting is restored after."""
    import importlib.util

    from fused_segloss import ops

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "label_bytes_ab.py"
    spec = importlib.util.spec_from_file_location("label_bytes_ab", path)
    ab = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ab)
    monkeypatch.setattr(ops, "label_bytes_min_input_bytes", 0)
    seen = []
    measure = _bench_anatomy.measure

    def recording_measure(shape, steps, **kwargs):
        seen.append(ops.label_bytes_enabled)
        return measure(shape, steps, **kwargs)
    monkeypatch.setattr(ab.anatomy, "measure", recording_measure)
    assert ab.main(["--sizes", "16", "--blocks", "2", "--steps", "2"]) == 0
    assert seen == [True, False, False, True] * 2  # 2 conditions x 2 blocks
    assert ops.label_bytes_enabled is True
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and all("on/off" in line and "grad op" in line for line in out)
