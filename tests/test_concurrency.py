"""Determinism and concurrency.

- The CPU results (stats and gradients, fused op and XLA path) are bitwise identical across
  20 runs, across intra-op thread settings 1, 2, 4 and the default (subprocesses: the
  setting must be made before TensorFlow initialises), under
  tf.config.experimental.enable_op_determinism(), and in the core module for 1-8 threads.
- The op called from 8 Python threads at once, on different inputs, returns exactly what
  serial calls return (fused op eagerly, inside a tf.function, inside XLA, and _core).
"""
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import tensorflow as tf

import fused_segloss as fsl
from fused_segloss import _core

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# Problems big enough that the kernels cut them into several work items (32768 elements
# each; channels_first rows of 40000 positions need two): the cases where a thread count
# could change the order of a sum.
# (shape, data_format, dtype, activation); softmax problems use uint8 class ids.
PROBLEMS = {
    "channels_last-float32": ((2, 160, 160, 3), "channels_last", np.float32, "sigmoid"),
    "channels_first-float32": ((2, 3, 200, 200), "channels_first", np.float32, "sigmoid"),
    "channels_last-float16-C17": ((1, 90, 90, 17), "channels_last", np.float16, "sigmoid"),
    "softmax-channels_last-C21": ((2, 120, 120, 21), "channels_last", np.float32, "softmax"),
    "softmax-channels_first-C5": ((2, 5, 200, 200), "channels_first", np.float32, "softmax"),
}
IGNORE_INDEX = 255


def make_inputs(shape, data_format, dtype, activation="sigmoid", seed=0):
    """(x, z, w, pw): float labels and pos_weight for sigmoid; for softmax, uint8 class ids
    (some equal to IGNORE_INDEX) and no pos_weight."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0.0, 3.0, shape).astype(dtype)
    w_shape = list(shape)
    class_axis = len(shape) - 1 if data_format == "channels_last" else 1
    w_shape[class_axis] = 1
    w = rng.uniform(0.0, 2.0, w_shape).astype(np.float32)
    classes = shape[class_axis]
    if activation == "softmax":
        ids = rng.integers(0, classes, np.delete(shape, class_axis)).astype(np.uint8)
        ids[rng.random(ids.shape) < 0.1] = IGNORE_INDEX
        return x, ids, w, None
    z = rng.random(shape).astype(np.float32)
    pw = rng.uniform(0.5, 3.0, classes).astype(np.float32)
    return x, z, w, pw


def _stats_and_grad_tensors(x, z, w, pw, data_format):
    """[B, C, 8] stats and d(sum(stats * upstream))/dlogits with a fixed upstream. Sparse
    labels (one rank less than the logits) mean softmax mode."""
    softmax = len(z.shape) < len(x.shape)
    options = {"activation": "softmax", "ignore_index": IGNORE_INDEX} if softmax else {}
    with tf.GradientTape() as tape:
        tape.watch(x)
        stats = fsl.segloss_stats(x, z, w, pw, data_format=data_format, **options)
        upstream = tf.reshape(tf.range(tf.size(stats), dtype=tf.float32) % 7.0 - 3.0,
                              tf.shape(stats))
        value = tf.reduce_sum(stats * upstream)
    return stats, tape.gradient(value, x)


def stats_and_grad(x, z, w, pw, data_format, jit=False):
    """_stats_and_grad_tensors on NumPy inputs, eagerly or under XLA."""
    def compute(x, z, w, pw):
        return _stats_and_grad_tensors(x, z, w, pw, data_format)

    if jit:
        compute = tf.function(compute, jit_compile=True)
    stats, grad = compute(*(None if a is None else tf.convert_to_tensor(a) for a in (x, z, w, pw)))
    return np.asarray(stats), np.asarray(grad)


def assert_bitwise_equal(a, b, what):
    assert a.dtype == b.dtype and a.shape == b.shape, what
    assert a.tobytes() == b.tobytes(), f"{what}: not bitwise identical"


def require_library():
    if not fsl.fused_available():
        pytest.skip("the op library is not built")


# ------------------------------------------------------------------------------ determinism
@pytest.mark.parametrize("problem_id", sorted(PROBLEMS))
@pytest.mark.parametrize("jit", [False, True], ids=["fused", "xla"])
def test_twenty_runs_are_bitwise_identical(problem_id, jit):
    require_library()
    shape, data_format, dtype, activation = PROBLEMS[problem_id]
    inputs = make_inputs(shape, data_format, dtype, activation, seed=1)
    first_stats, first_grad = stats_and_grad(*inputs, data_format, jit=jit)
    assert np.isfinite(first_stats).all() and np.isfinite(first_grad.astype(np.float64)).all()
    for run in range(19):
        stats, grad = stats_and_grad(*inputs, data_format, jit=jit)
        assert_bitwise_equal(stats, first_stats, f"stats, run {run + 2}")
        assert_bitwise_equal(grad, first_grad, f"gradient, run {run + 2}")


# One script per setting; each writes every problem's stats and gradient (fused op and
# XLA path) to an .npz file. TF's threading must be configured before its first op runs.
_SUBPROCESS_SCRIPT = r"""
import os, sys
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import numpy as np
import tensorflow as tf
setting, out_path = sys.argv[1], sys.argv[2]
if setting == "op_determinism":
    tf.config.experimental.enable_op_determinism()
elif setting != "default":
    tf.config.threading.set_intra_op_parallelism_threads(int(setting))
sys.path.insert(0, {tests_dir!r})
import fused_segloss as fsl
assert fsl.fused_available(), "the op library did not load"
import test_concurrency as t
arrays = {{"intra_op_threads": np.array(tf.config.threading.get_intra_op_parallelism_threads())}}
for name, (shape, data_format, dtype, activation) in t.PROBLEMS.items():
    inputs = t.make_inputs(shape, data_format, dtype, activation, seed=1)
    for jit in (False, True):
        stats, grad = t.stats_and_grad(*inputs, data_format, jit=jit)
        arrays[f"{{name}}-jit{{jit}}-stats"] = stats
        arrays[f"{{name}}-jit{{jit}}-grad"] = grad
np.savez(out_path, **arrays)
"""


@pytest.mark.slow
def test_results_are_identical_across_thread_settings_and_under_op_determinism(tmp_path):
    require_library()
    script = tmp_path / "run_setting.py"
    script.write_text(_SUBPROCESS_SCRIPT.format(tests_dir=HERE))
    settings = ("1", "2", "4", "default", "op_determinism")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get(
        "PYTHONPATH")]))}
    running = {s: subprocess.Popen([sys.executable, str(script), s, str(tmp_path / f"{s}.npz")],
                                   cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True) for s in settings}
    outputs = {s: p.communicate(timeout=600)[0] for s, p in running.items()}
    for s, p in running.items():
        assert p.returncode == 0, f"setting {s} failed:\n{outputs[s][-3000:]}"
    results = {s: dict(np.load(tmp_path / f"{s}.npz")) for s in settings}
    for threads in ("1", "2", "4"):
        assert results[threads]["intra_op_threads"] == int(threads)
    baseline = results["1"]
    for setting in settings[1:]:
        for key, value in baseline.items():
            if key != "intra_op_threads":
                assert_bitwise_equal(results[setting][key], value, f"{key} with {setting}")
    # And the same bits as in this process (default settings, after other tests ran).
    for name, (shape, data_format, dtype, activation) in PROBLEMS.items():
        stats, grad = stats_and_grad(*make_inputs(shape, data_format, dtype, activation, seed=1),
                                     data_format)
        assert_bitwise_equal(stats, baseline[f"{name}-jitFalse-stats"], name)
        assert_bitwise_equal(grad, baseline[f"{name}-jitFalse-grad"], name)


def test_core_module_is_bitwise_identical_across_thread_counts():
    rng = np.random.default_rng(3)
    for shape, channels_last in (((3, 70000, 2), True), ((2, 3, 70000), False)):
        x = rng.normal(0.0, 3.0, shape).astype(np.float32)
        z = rng.random(shape).astype(np.float32)
        upstream = rng.normal(0.0, 1.0, (shape[0], shape[2 if channels_last else 1], 8))
        outputs = [(_core.stats(x, z, None, None, channels_last, True, threads),
                    _core.logit_grad(x, z, None, None, upstream.astype(np.float32),
                                     channels_last, True, threads))
                   for threads in (1, 2, 3, 8)]
        for threads, (stats, grad) in zip((2, 3, 8), outputs[1:]):
            assert_bitwise_equal(stats, outputs[0][0], f"_core stats, {threads} threads")
            assert_bitwise_equal(grad, outputs[0][1], f"_core gradient, {threads} threads")


def test_bitwise_comparisons_can_fail():
    """Guard for the tests above: a different input does give different bits."""
    require_library()
    x, z, w, pw = make_inputs(*PROBLEMS["channels_last-float32"], seed=1)
    stats, _ = stats_and_grad(x, z, w, pw, "channels_last")
    nudged, _ = stats_and_grad(x + np.float32(1e-3), z, w, pw, "channels_last")
    assert stats.tobytes() != nudged.tobytes()


# ------------------------------------------------------------------------------ concurrency
THREADS = 8
REPEATS = 4  # each thread calls the op this many times, to overlap the calls for longer


def concurrent_inputs():
    """8 different problems: shapes, layouts and dtypes differ between threads."""
    problems = []
    for i in range(THREADS):
        data_format = "channels_last" if i % 2 == 0 else "channels_first"
        dtype = (np.float32, np.float16, np.float64, tf.bfloat16.as_numpy_dtype)[i % 4]
        classes = 1 + i
        spatial = (40 + 7 * i, 33)
        shape = (2, *spatial, classes) if data_format == "channels_last" else (2, classes,
                                                                               *spatial)
        problems.append((make_inputs(shape, data_format, dtype, seed=100 + i), data_format))
    return problems


def run_in_threads(fn, problems):
    """fn(problem) for every problem, each in its own thread, started together."""
    barrier = threading.Barrier(len(problems))
    results = [None] * len(problems)
    errors = []

    def worker(index):
        try:
            barrier.wait()
            results[index] = [fn(problems[index]) for _ in range(REPEATS)]
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append((index, exc))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(problems))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    return results


def _eager(problem):
    inputs, data_format = problem
    return stats_and_grad(*inputs, data_format)


_SIGNATURE_CACHE = {}


def _graph(problem, jit=False):
    """One shared tf.function (per dtype and layout) called from every thread."""
    (x, z, w, pw), data_format = problem
    key = (x.dtype.name, data_format, jit)
    if key not in _SIGNATURE_CACHE:
        specs = [tf.TensorSpec([None] * x.ndim, tf.as_dtype(x.dtype)),
                 tf.TensorSpec([None] * x.ndim, tf.float32),
                 tf.TensorSpec([None] * x.ndim, tf.float32), tf.TensorSpec([None], tf.float32)]

        def fn(x, z, w, pw):
            return _stats_and_grad_tensors(x, z, w, pw, data_format)

        _SIGNATURE_CACHE[key] = tf.function(fn, input_signature=specs, jit_compile=jit)
    stats, grad = _SIGNATURE_CACHE[key](x, z, w, pw)
    return np.asarray(stats), np.asarray(grad)


def _xla(problem):
    return _graph(problem, jit=True)


def _core_call(problem):
    (x, z, w, pw), data_format = problem
    channels_last = data_format == "channels_last"
    b = x.shape[0]
    classes = x.shape[-1] if channels_last else x.shape[1]
    canonical = w.reshape((b, -1, 1) if channels_last else (b, 1, -1))
    g = np.linspace(-2.0, 2.0, b * classes * 8, dtype=np.float32).reshape(b, classes, 8)
    return (_core.stats(x, z, canonical, pw, channels_last=channels_last, threads=2),
            _core.logit_grad(x, z, canonical, pw, g, channels_last=channels_last, threads=2))


@pytest.mark.parametrize("call", [_eager, _graph, _xla, _core_call],
                         ids=["fused-eager", "tf.function", "xla", "core"])
def test_eight_threads_at_once_match_serial_calls(call):
    if call is not _core_call:
        require_library()
    problems = concurrent_inputs()
    serial = [call(p) for p in problems]
    concurrent = run_in_threads(call, problems)
    for index, (expected, repeats) in enumerate(zip(serial, concurrent)):
        for repeat, got in enumerate(repeats):
            for part, a, b in zip(("stats", "gradient"), got, expected):
                assert_bitwise_equal(a, b, f"thread {index}, call {repeat}, {part}")
