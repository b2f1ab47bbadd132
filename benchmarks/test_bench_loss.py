"""pytest-benchmark suite: forward+backward of every loss path of `python -m fused_segloss bench`.

    python -m pytest benchmarks/                     # 8x512x512x5
    FSL_BENCH_SIZE=64 python -m pytest benchmarks/   # smaller images (the smoke test uses 16)

Each path is the bench's own step (fused_segloss/bench/loss.py), in one pytest-benchmark
group, so pytest-benchmark's table shows each one's time relative to the fastest. Each
benchmark also checks its loss against float64 NumPy and its gradient against the
reference's, so a fast wrong path fails. The bench itself interleaves the paths round by
round and adds the bytes-moved floor and peak memory; prefer it for ratios.
"""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is imported

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import fused_segloss  # noqa: E402
from fused_segloss.bench import loss  # noqa: E402

SHAPE = loss.Shape(8, int(os.environ.get("FSL_BENCH_SIZE", "512")), 5)
GROUP = f"seg_loss fwd+bwd {SHAPE.batch}x{SHAPE.size}x{SHAPE.size}x{SHAPE.classes} float32"


def expected_total(logits, labels, smooth=1e-5):
    """seg_loss's default total in float64 NumPy: mean CE over classes (each the mean over
    its elements) + 1 - mean over classes of the batch soft Dice."""
    x, z = np.asarray(logits, np.float64), np.asarray(labels, np.float64)
    axes = tuple(range(x.ndim - 1))
    ce = np.maximum(x, 0) - x * z + np.log1p(np.exp(-np.abs(x)))
    p = 1.0 / (1.0 + np.exp(-x))
    dice = (2 * np.sum(p * z, axis=axes) + smooth) / (
        np.sum(p, axis=axes) + np.sum(z, axis=axes) + smooth)
    return np.mean(np.mean(ce, axis=axes)) + 1.0 - np.mean(dice)


@pytest.fixture(scope="module")
def inputs():
    return loss.make_inputs(SHAPE)


@pytest.fixture(scope="module")
def reference_gradient(inputs):
    return loss.make_step("reference (tf.function)", SHAPE)(*inputs)[1].numpy()


@pytest.mark.benchmark(group=GROUP)
@pytest.mark.parametrize("label", SHAPE.paths())
def test_loss_forward_backward(benchmark, label, inputs, reference_gradient):
    if label == loss.FUSED and not fused_segloss.fused_available():
        pytest.skip("the compiled library is not loaded")
    step = loss.make_step(label, SHAPE)
    step(*inputs)  # trace and compile outside the timed rounds
    value, grad = benchmark(step, *inputs)

    # float32 sums of ~1e7 terms: 1e-4 relative leaves room for summation order, not bugs.
    np.testing.assert_allclose(value, expected_total(*(t.numpy() for t in inputs)), rtol=1e-4)
    scale = np.max(np.abs(reference_gradient))
    np.testing.assert_allclose(grad.numpy() / scale, reference_gradient / scale, atol=1e-4)


@pytest.mark.benchmark(group=GROUP)
def test_bytes_moved_floor(benchmark):
    floor = loss.Floor(SHAPE.bytes_moved)
    benchmark(floor)
    np.testing.assert_array_equal(floor.dst, floor.src)
    assert floor.src.nbytes * 2 == SHAPE.bytes_moved
    floor.pool.shutdown()
