"""`python -m fused_segloss bench` (fused_segloss/bench/): its pieces compute what they say,
and the --quick run prints every row of both sections and writes them as JSON.

Timing assertions are only the ones no noise can flip at these sizes (times are positive,
the bytes-moved floor is below the fused step); the numbers come from a full run."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import fused_segloss as fsl
from fused_segloss import bench
from fused_segloss.bench import e2e, loss, memory

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOSS_ROWS = loss.Shape(1, 8, 2).paths() + [loss.FLOOR]  # no focal: no plain-fused row
needs_library = pytest.mark.skipif(not fsl.fused_available(), reason="library not loaded")


def _run(args, env_extra=None, timeout=900):
    # Without the pytest-xdist worker's variables: a pytest child that sees them thinks it
    # is a worker itself, and pytest-benchmark then disables its timing.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}
    env.update(TF_CPP_MIN_LOG_LEVEL="2", **(env_extra or {}))
    done = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, f"{args} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def _table_rows(stdout, title):
    """{label: cells} of the table whose title starts with `title`."""
    block = stdout.split("\n" + title, 1)[1].split("\n\n", 1)[0].splitlines()[2:]
    return {line[:32].strip(): line[32:].split() for line in block if not line.startswith("(")}


# ---- the pieces, in process ------------------------------------------------------------------

def test_options_quick_defaults_and_errors():
    args = bench.parse_args(["--quick", "--classes", "7", "--channels", "channels_first"])
    assert (args.batch, args.size, args.classes, args.channels) == (2, 32, 7, "channels_first")
    assert args.sections == ["loss", "e2e"] and args.out is None
    full = bench.parse_args(["--sections", "loss", "--size", "100"])  # no U-Net: any size
    assert (full.batch, full.size, full.e2e_batch, full.sections) == (8, 100, 4, ["loss"])
    for bad in (["--sections", "speed"], ["--size", "100"], ["--batch", "0"],
                ["--channels", "nchw"]):
        with pytest.raises(SystemExit):
            bench.parse_args(bad)


# The bench's losses: sigmoid and softmax, plain and focal, both layouts.
LOSSES = [("channels_last", "sigmoid", 0.0), ("channels_first", "sigmoid", 0.0),
          ("channels_last", "sigmoid", 2.0), ("channels_last", "softmax", 0.0),
          ("channels_first", "softmax", 0.0), ("channels_last", "softmax", 2.0)]


@pytest.mark.parametrize("data_format,activation,gamma", LOSSES)
def test_hand_written_loss_is_seg_loss(data_format, activation, gamma):
    shape = loss.Shape(2, 16, 3, data_format, activation, gamma)
    logits, labels = loss.make_inputs(shape)
    assert labels.dtype == (tf.uint8 if activation == "softmax" else tf.float32)
    expected = fsl.seg_loss(logits, labels, implementation="reference",
                            **loss.fused_options(shape))
    assert float(loss.plain_loss(logits, labels, shape)) == pytest.approx(
        float(expected), rel=1e-5)


@pytest.mark.parametrize("data_format,activation,gamma", LOSSES)
def test_every_path_gives_the_same_loss_and_gradient(data_format, activation, gamma):
    shape = loss.Shape(2, 8, 3, data_format, activation, gamma)
    inputs = loss.make_inputs(shape)
    reference = loss.make_step("reference (tf.function)", shape)(*inputs)
    assert (loss.FUSED_PLAIN in shape.paths()) == (gamma != 0)
    for label in shape.paths():
        if label in (loss.FUSED, loss.FUSED_PLAIN) and not fsl.fused_available():
            continue
        value, grad = loss.make_step(label, shape)(*inputs)
        assert grad.shape == shape.logits_shape() and grad.dtype == tf.float32
        if label == loss.FUSED_PLAIN:  # the plain loss: not the focal one
            assert value != pytest.approx(reference[0], rel=1e-3)
            continue
        assert value == pytest.approx(reference[0], rel=1e-5), label
        np.testing.assert_allclose(grad.numpy(), reference[1].numpy(), atol=1e-7, rtol=1e-4)


@pytest.mark.parametrize("activation,per_element", [("sigmoid", 20), ("softmax", 12 + 2 / 3)])
def test_floor_copies_the_bytes_the_fused_passes_move(activation, per_element):
    shape = loss.Shape(2, 10, 3, activation=activation)
    assert shape.bytes_moved == pytest.approx(shape.elements * per_element)
    floor = loss.Floor(shape.bytes_moved)
    floor()
    floor.pool.shutdown()
    np.testing.assert_array_equal(floor.dst, floor.src)
    assert 2 * floor.src.nbytes == shape.bytes_moved  # read + written


def test_measure_interleaves_every_row_in_the_same_rounds():
    logged = []
    shape = loss.Shape(1, 8, 2)
    rows, rounds = loss.measure(shape, rounds=(2, 2), budget_s=0.0,
                                with_fused=False, log=logged.append)
    assert rounds == 2 and list(rows) == LOSS_ROWS and "2 rounds" in logged[0]
    assert "unavailable" in rows[loss.FUSED]["note"] and "median_ms" not in rows[loss.FUSED]
    for label in LOSS_ROWS[1:]:
        assert 0 < rows[label]["min_ms"] <= rows[label]["median_ms"]
    assert rows[loss.FLOOR]["bytes_moved"] == shape.bytes_moved


def test_table_marks_missing_values_and_appends_notes():
    text = bench.table("T", "path", [("time ms", ".2f", "t"), ("x", ".1f", "x")],
                       {"a": {"t": 1.234, "x": None}, "b": {"note": "  unavailable"}})
    assert text.splitlines() == ["T", f"{'path':<32}  time ms  x",
                                 f"{'a':<32}{'1.23':>9}{'-':>3}",
                                 f"{'b':<32}{'-':>9}{'-':>3}  unavailable"]


# ---- fresh processes ---------------------------------------------------------------------------

@pytest.mark.slow
def test_memory_probe_measures_the_gradient_and_the_temporaries():
    """At 2x256x256x3 (1.5 MB of logits) every path allocates at least its gradient;
    the reference also materialises several logits-sized temporaries."""
    shape = loss.Shape(2, 256, 3)
    probes = {label: memory.measure(label, shape) for label in shape.paths()
              if label != loss.FUSED or fsl.fused_available()}
    for label, probe in probes.items():
        assert "error" not in probe, (label, probe)
        assert probe["peak_extra_bytes"] >= 0.9 * 4 * shape.elements, (label, probe)
    assert probes["reference (tf.function)"]["x_logits"] > 2.0
    if loss.FUSED in probes:
        assert probes[loss.FUSED]["x_logits"] < probes["reference (tf.function)"]["x_logits"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    stdout = _run(["-m", "fused_segloss", "bench", "--quick", "--out", str(out)])
    return stdout, json.loads(out.read_text())


@pytest.mark.slow
@needs_library
def test_quick_run_prints_every_row_of_both_sections(quick_run):
    stdout, _ = quick_run
    assert stdout.startswith("machine: ") and "compiled library loaded: yes" in stdout
    assert "TF " + tf.__version__ in stdout.splitlines()[0]
    rows = _table_rows(stdout, "Loss, forward+backward")
    assert list(rows) == LOSS_ROWS
    times = {label: float(cells[0]) for label, cells in rows.items()}
    assert all(t > 0 for t in times.values()) and times[loss.FUSED] > times[loss.FLOOR]
    assert rows[loss.FUSED][1] == "1.00"
    e2e_rows = _table_rows(stdout, "End to end, Keras model.fit")
    assert list(e2e_rows) == list(e2e.CONFIGS)
    assert all(float(cells[0]) > 0 and float(cells[-1]) > 0 for cells in e2e_rows.values())
    assert e2e_rows[e2e.TRIVIAL][3:5] == ["0.0", "0.0"]  # the trivial step is the baseline


@pytest.mark.slow
@needs_library
def test_quick_run_json_has_every_measurement(quick_run):
    _, result = quick_run
    assert result["machine"]["compiled_library_loaded"] is True
    assert result["config"]["quick"] is True and result["config"]["sections"] == ["loss", "e2e"]
    rows = result["loss"]["rows"]
    assert list(rows) == LOSS_ROWS and result["loss"]["rounds"] == 3
    assert result["loss"]["losses_agree"] is True
    for label in LOSS_ROWS[:-1]:
        r = rows[label]
        assert r["median_ms"] > 0 and r["vs_fused"] == pytest.approx(
            r["median_ms"] / rows[loss.FUSED]["median_ms"])
        assert isinstance(r["peak_extra_bytes"], int) and r["peak_extra_bytes"] >= 0
        assert r["x_logits"] == pytest.approx(r["peak_extra_bytes"] / (4 * 2 * 32 * 32 * 3))
    assert rows[loss.FLOOR]["median_ms"] < rows[loss.FUSED]["median_ms"]
    configs = result["e2e"]["rows"]
    assert list(configs) == list(e2e.CONFIGS)
    trivial = configs[e2e.TRIVIAL]["step_ms"]
    for r in configs.values():
        assert r["steps"] == 2 and r["step_ms"] > 0 and r["peak_rss_bytes"] > 0
        assert r["iqr_ms"] >= 0
        assert isinstance(r["jit_compile"], bool)
        assert r["overhead_ms"] == pytest.approx(r["step_ms"] - trivial)
    # SegLoss and the hand-written loss train on the same data: the same loss value
    assert configs[e2e.SEGLOSS]["loss"] == pytest.approx(configs[e2e.PLAIN]["loss"], rel=1e-3)


@pytest.mark.slow
def test_without_the_library_the_fused_row_says_so():
    stdout = _run(["-m", "fused_segloss", "bench", "--quick", "--sections", "loss"],
                  env_extra={"FUSED_SEGLOSS_DISABLE_LIBRARY": "1"})
    assert "compiled library loaded: NO" in stdout and "End to end" not in stdout
    rows = _table_rows(stdout, "Loss, forward+backward")
    assert list(rows) == LOSS_ROWS
    assert rows[loss.FUSED][:4] == ["-"] * 4 and "unavailable:" in rows[loss.FUSED]
    assert all(float(rows[label][0]) > 0 for label in LOSS_ROWS[1:])


@pytest.mark.slow
def test_pytest_benchmark_suite_runs_small(tmp_path):
    json_path = tmp_path / "pb.json"
    stdout = _run(["-m", "pytest", "benchmarks", "-q", "--benchmark-min-rounds=2",
                   "--benchmark-max-time=0.02", "--benchmark-warmup=off",
                   f"--benchmark-json={json_path}"], env_extra={"FSL_BENCH_SIZE": "16"})
    assert "seg_loss fwd+bwd 8x16x16x5 float32" in stdout
    data = json.loads(json_path.read_text())
    names = {b["name"] for b in data["benchmarks"]}
    assert names >= {f"test_loss_forward_backward[{label}]" for label in LOSS_ROWS[1:-1]}
    assert "test_bytes_moved_floor" in names
    assert all(b["stats"]["rounds"] >= 2 for b in data["benchmarks"])
