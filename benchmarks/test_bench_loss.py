"""Forward+backward (and forward only) of seg_loss at 8x512x512x5 float32 (FSL_BENCH_SIZE
changes 512) on every path, one pytest-benchmark group per direction. Each benchmark also
checks its loss against float64 NumPy and its gradient against the reference's, so a fast
wrong path fails."""
import numpy as np
import pytest
import tensorflow as tf

import fused_segloss
from fused_segloss import _bench_paths as bp

from fsl_bench_support import FORWARD_GROUP, FUSED_LABEL, GROUP

PATHS = ["fused", "fused_function", "reference", "reference_function", "reference_xla",
         "xla_auto", "plain_xla"]


@pytest.fixture(scope="module")
def reference_gradient(seg_inputs):
    _, inputs = seg_inputs
    step = bp.make_step(bp.PATHS["reference"], "fwd_bwd", "channels_last")
    return bp.run_step(step, inputs)[1].numpy()


def _prepared_step(path, direction, inputs):
    spec = bp.PATHS[path]
    if spec.implementation == "fused" and not fused_segloss.fused_available():
        pytest.skip("the op library is not built")
    step = bp.make_step(spec, direction, "channels_last")
    bp.run_step(step, inputs)  # trace / compile outside the timed rounds
    label = spec.label
    if spec.mode == "xla":
        label = bp.xla_label(spec, bp.compiled_custom_calls(step, inputs))
    return step, label


@pytest.mark.benchmark(group=GROUP)
@pytest.mark.parametrize("path", PATHS)
def test_seg_loss_forward_backward(benchmark, path, seg_inputs, expected_loss,
                                   reference_gradient, ratio_board):
    _, inputs = seg_inputs
    step, label = _prepared_step(path, "fwd_bwd", inputs)
    benchmark.extra_info["label"] = label
    loss, grad = benchmark(bp.run_step, step, inputs)
    ratio_board.record(GROUP, label, benchmark, FUSED_LABEL)

    # float32 sums of ~1e7 terms: 1e-4 relative leaves room for summation order, not for bugs.
    np.testing.assert_allclose(float(loss), expected_loss, rtol=1e-4)
    assert grad.dtype == tf.float32 and grad.shape == inputs[0].shape
    scale = np.max(np.abs(reference_gradient))
    np.testing.assert_allclose(grad.numpy() / scale, reference_gradient / scale, atol=1e-4)


@pytest.mark.benchmark(group=FORWARD_GROUP)
@pytest.mark.parametrize("path", PATHS)
def test_seg_loss_forward(benchmark, path, seg_inputs, expected_loss, ratio_board):
    _, inputs = seg_inputs
    step, label = _prepared_step(path, "fwd", inputs)
    benchmark.extra_info["label"] = label
    loss = benchmark(bp.run_step, step, inputs)
    ratio_board.record(FORWARD_GROUP, label, benchmark, FUSED_LABEL)
    np.testing.assert_allclose(float(loss), expected_loss, rtol=1e-4)
