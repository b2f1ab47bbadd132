"""The CPU results are bitwise identical across runs and thread counts (DESIGN §6).

TF's thread pools are configured once, before TF initialises, so each thread count runs
in its own subprocess; the problems are large enough that every row (image, or image and
class for channels_first) is cut into several work items.
"""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

import fused_segloss as fsl

PROBLEMS = [  # (name, logits shape, data_format, logits dtype, weights shape)
    ("last", (4, 128, 128, 5), "channels_last", "float32", (4, 128, 128, 1)),
    ("first", (2, 3, 190, 190), "channels_first", "float32", (2, 1, 190, 190)),
    ("half", (2, 200, 200, 2), "channels_last", "float16", None),
]

_COMPUTE = textwrap.dedent("""
    import numpy as np
    import tensorflow as tf
    import fused_segloss as fsl

    def compute(problems):
        out = {}
        rng = np.random.default_rng(7)
        for name, shape, data_format, dtype, weights_shape in problems:
            x = tf.constant(rng.normal(0.0, 3.0, shape).astype(dtype))
            z = rng.random(shape).astype(np.float32)
            w = None if weights_shape is None else rng.uniform(0, 2, weights_shape)
            with tf.GradientTape() as tape:
                tape.watch(x)
                stats = fsl.segloss_stats(x, z, w, data_format=data_format, squared=True,
                                          implementation="fused")
                total = fsl.combine(stats, dice_mode="per_image").total
            out[name + "/stats"] = stats.numpy()
            out[name + "/grad"] = tape.gradient(total, x).numpy()
        return out
""")

_SUBPROCESS = _COMPUTE + textwrap.dedent("""
    import json, sys
    threads, path, problems = int(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    assert fsl.fused_available(), "the op library did not load"
    np.savez(path, **compute(problems))
    assert tf.config.threading.get_intra_op_parallelism_threads() == threads
""")


def _in_process_compute():
    namespace = {}
    exec(_COMPUTE, namespace)  # the same code as the subprocesses, default thread pool
    return namespace["compute"](PROBLEMS)


def assert_bitwise_equal(a, b, what):
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        assert a[key].tobytes() == b[key].tobytes(), \
            f"{what}: {key} differs in {int((a[key] != b[key]).sum())} entries"


@pytest.mark.skipif(not fsl.fused_available(), reason="needs the compiled op library")
def test_repeated_runs_are_bitwise_identical():
    first = _in_process_compute()
    for _ in range(2):
        assert_bitwise_equal(first, _in_process_compute(), "repeated run")


@pytest.mark.slow
@pytest.mark.skipif(not fsl.fused_available(), reason="needs the compiled op library")
def test_one_two_and_four_intra_op_threads_are_bitwise_identical(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(_SUBPROCESS)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("FUSED_SEGLOSS_DISABLE_LIBRARY", None)
    runs = {}
    for threads in (1, 2, 4):
        path = tmp_path / f"threads{threads}.npz"
        runs[threads] = (path, subprocess.Popen(
            [sys.executable, str(script), str(threads), str(path), json.dumps(PROBLEMS)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = {}
    for threads, (path, proc) in runs.items():
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"threads={threads} failed:\n{stderr[-3000:]}"
        with np.load(path) as data:
            results[threads] = {key: data[key] for key in data.files}
    assert_bitwise_equal(results[1], results[2], "1 vs 2 threads")
    assert_bitwise_equal(results[1], results[4], "1 vs 4 threads")
    assert_bitwise_equal(results[1], _in_process_compute(), "1 thread vs this process")


def test_core_module_is_bitwise_identical_across_thread_counts(rng):
    from fused_segloss import _core

    for shape, channels_last in (((3, 70000, 2), True), ((2, 3, 70000), False)):
        x = rng.normal(0.0, 3.0, shape).astype(np.float32)
        z = rng.random(shape).astype(np.float32)
        upstream = rng.normal(0.0, 1.0, (shape[0], shape[2 if channels_last else 1], 8))
        outputs = []
        for threads in (1, 2, 3, 8):
            outputs.append({
                "stats": _core.stats(x, z, None, None, channels_last, True, threads),
                "grad": _core.logit_grad(x, z, None, None, upstream.astype(np.float32),
                                         channels_last, True, threads)})
        for threads, out in zip((2, 3, 8), outputs[1:]):
            assert_bitwise_equal(outputs[0], out, f"_core 1 vs {threads} threads")


def test_fused_stats_are_not_trivially_equal(rng):
    """Guard for the tests above: different inputs do give different bits."""
    x = rng.normal(0.0, 3.0, (2, 50, 3)).astype(np.float32)
    z = rng.random(x.shape).astype(np.float32)
    a = fsl.segloss_stats(x, z).numpy()
    b = fsl.segloss_stats(x + np.float32(1e-3), z).numpy()
    assert a.tobytes() != b.tobytes()
    assert tf.reduce_all(tf.math.is_finite(a))
