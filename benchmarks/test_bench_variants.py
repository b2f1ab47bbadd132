"""The fused path (eager, forward+backward) on every variant: both layouts, float32 /
bfloat16 / float16 logits, float32 / uint8 labels, with and without a per-pixel weight map
[B, H, W, 1]. The loss is checked against float64 NumPy on the same (rounded) inputs."""
import numpy as np
import pytest
import tensorflow as tf

import fused_segloss
from fused_segloss import _bench_paths as bp

from fsl_bench_support import BATCH, CLASSES, SIZE, VARIANTS_GROUP, expected_total

BASE = bp.CaseShape(BATCH, SIZE, CLASSES)
VARIANTS = [BASE._replace(layout=layout, logits_dtype=xd, labels_dtype=zd, weights=w)
            for layout in bp.LAYOUTS for xd in bp.LOGIT_DTYPES for zd in bp.LABEL_DTYPES
            for w in (False, True)]
BASE_LABEL = "channels_last float32 float32"
# bfloat16 / float16 logits only change the inputs (compared exactly after upcasting); the sums
# are float32 in every kernel, so the same 1e-4 relative bound as float32 applies.
RTOL = 1e-4


def _label(shape):
    text = f"{shape.layout} {shape.logits_dtype} {shape.labels_dtype}"
    return text + (" +weights" if shape.weights else "")


@pytest.mark.benchmark(group=VARIANTS_GROUP)
@pytest.mark.parametrize("shape", VARIANTS, ids=_label)
def test_fused_variant_forward_backward(benchmark, shape, ratio_board):
    if not fused_segloss.fused_available():
        pytest.skip("the op library is not built")
    inputs = bp.make_inputs(shape)
    step = bp.make_step(bp.PATHS["fused"], "fwd_bwd", shape.layout)
    bp.run_step(step, inputs)
    loss, grad = benchmark(bp.run_step, step, inputs)
    ratio_board.record(VARIANTS_GROUP, _label(shape), benchmark, BASE_LABEL)

    logits, labels, weights = (None if t is None else tf.cast(t, tf.float64).numpy()
                               for t in inputs)
    expected = expected_total(logits, labels, weights, shape.layout == "channels_last")
    np.testing.assert_allclose(float(loss), expected, rtol=RTOL)
    assert grad.dtype == inputs[0].dtype and grad.shape == inputs[0].shape
