"""Property-based fuzzing: random problems, fused vs reference vs float64 NumPy.

Hypothesis draws the shape (batch 0-3, spatial rank 0-3, C 1-6), layout, logits and labels
dtypes, weights of a random broadcast shape (NumPy-style, possibly of lower rank), an
optional pos_weight, squared, logits of very different scales (exact zeros and ±1e4
included) and every combine option. For each problem the fused op and the pure-TF
reference must both match tests/numpy_reference.py: the statistics, the total loss and
the loss's gradient, none of them NaN or Inf.

Budget: FSL_FUZZ_EXAMPLES examples (default 120; about a minute on 2 cores), no deadline.
"""
import os
import types

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fused_segloss as fsl
import numpy_reference as npref
from test_gradients import naive_rounding_floor

EXAMPLES = int(os.environ.get("FSL_FUZZ_EXAMPLES", "120"))
LOGIT_DTYPES = {"float32": np.float32, "float64": np.float64, "float16": np.float16,
                "bfloat16": tf.bfloat16.as_numpy_dtype}
LABEL_DTYPES = {**LOGIT_DTYPES, "uint8": np.uint8, "bool": np.bool_}
# See test_numerics.LOSS_RTOL: stats within 2e-5 (conftest STATS_RTOL) through float32
# combine arithmetic.
LOSS_RTOL = 1e-4


@st.composite
def problems(draw):
    batch = draw(st.integers(0, 3) if draw(st.integers(0, 9)) == 0 else st.integers(1, 3))
    spatial = draw(st.lists(st.integers(1, 6), min_size=0, max_size=3))
    classes = draw(st.integers(1, 6))
    data_format = draw(st.sampled_from(["channels_last", "channels_first"]))
    shape = ([batch, *spatial, classes] if data_format == "channels_last"
             else [batch, classes, *spatial])
    logits_dtype = draw(st.sampled_from(sorted(LOGIT_DTYPES)))
    labels_dtype = draw(st.sampled_from(sorted(LABEL_DTYPES)))
    options = dict(
        dice_mode=draw(st.sampled_from(["batch", "per_image"])),
        empty=draw(st.sampled_from(["include", "exclude"])),
        smooth=draw(st.sampled_from([1e-5, 0.0, 1.0])),
        ce_weight=draw(st.sampled_from([1.0, 0.0, 0.3])),
        dice_weight=draw(st.sampled_from([1.0, 2.0])),
    )
    seed = draw(st.integers(0, 2 ** 32 - 1))
    rng = np.random.default_rng(seed)

    # With smooth = 0 a class with no positive label has Dice 0/0-like when its predictions
    # vanish, and whether P is exactly 0 depends on where each path's sigmoid underflows
    # (README.md, "Errors and numerics"): there, keep the logits where p is a normal float32.
    gentle = options["smooth"] == 0.0
    scale = draw(st.sampled_from([0.1, 3.0] if gentle else [0.1, 3.0, 30.0]))
    x = rng.normal(0.0, scale, shape)
    x[rng.random(shape) < 0.05] = 0.0
    if not gentle and draw(st.booleans()):
        x[rng.random(shape) < 0.2] = 1e4
        x[rng.random(shape) < 0.2] = -1e4
    if labels_dtype in ("uint8", "bool"):
        z = rng.random(shape) < draw(st.sampled_from([0.0, 0.3, 1.0]))
    else:
        z = rng.random(shape)
        z[rng.random(shape) < 0.3] = 0.0
        z[rng.random(shape) < 0.2] = 1.0
        if draw(st.booleans()):  # an empty class
            (z[..., 0] if data_format == "channels_last" else z[:, 0])[...] = 0.0

    weights = None
    if draw(st.booleans()):
        rank = draw(st.integers(0, len(shape)))
        w_shape = [d if draw(st.booleans()) else 1 for d in shape[len(shape) - rank:]]
        weights = rng.uniform(0.0, 2.0, w_shape)
        weights[rng.random(w_shape) < 0.2] = 0.0
        weights = weights.astype(np.float32)
    pos_weight = (rng.uniform(0.25, 4.0, classes).astype(np.float32)
                  if draw(st.booleans()) else None)
    if draw(st.booleans()):
        cw = rng.uniform(0.0, 3.0, classes)
        cw[rng.random(classes) < 0.3] = 0.0
        cw[rng.integers(classes)] = 1.0  # a positive sum
        options["class_weights"] = cw.astype(np.float32)
    return dict(logits=x.astype(LOGIT_DTYPES[logits_dtype]), labels=z.astype(
        LABEL_DTYPES[labels_dtype]), weights=weights, pos_weight=pos_weight,
        data_format=data_format, squared=draw(st.booleans()), options=options)


def run(implementation, p):
    x = tf.constant(p["logits"])
    with tf.GradientTape() as tape:
        tape.watch(x)
        stats = fsl.segloss_stats(x, p["labels"], p["weights"], p["pos_weight"],
                                  data_format=p["data_format"], squared=p["squared"],
                                  implementation=implementation)
        total = fsl.combine(stats, **p["options"]).total
    return stats.numpy(), float(total), tape.gradient(total, x).numpy()


@pytest.mark.slow
@settings(max_examples=EXAMPLES, deadline=None, print_blob=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(p=problems())
def test_fused_and_reference_match_numpy(p, check):
    if not fsl.fused_available():
        pytest.skip("the op library is not built")
    x = p["logits"]
    dtype = check.dtype_name(x)
    args = (x, p["labels"], p["weights"], p["pos_weight"], p["data_format"], p["squared"])
    expected_stats = npref.stats(*args)
    expected = npref.combine(expected_stats, **p["options"])
    upstream = npref.combine_grad(expected_stats, **p["options"])
    expected_grad = npref.logit_grad(*args[:4], upstream, *args[4:])
    scale = npref.logit_grad_scale(*args[:4], upstream, *args[4:])
    magnitude = abs(expected.ce) * p["options"]["ce_weight"] + p["options"]["dice_weight"]

    for implementation in ("fused", "reference"):
        stats, total, grad = run(implementation, p)
        rtol = check.stats_rtol(types.SimpleNamespace(logits=x, data_format=p["data_format"]),
                                implementation)
        check.stats(stats, expected_stats, dtype, rtol=rtol, what=f"{implementation} stats")
        assert np.isfinite(total), implementation
        assert abs(total - expected.total) <= LOSS_RTOL * magnitude, \
            (implementation, total, expected.total)
        assert grad.shape == x.shape and np.isfinite(grad.astype(np.float64)).all()
        # The upstream gradient comes from float32 combine arithmetic on float32 stats: a
        # Dice derivative carries the stats' error about 3 times; TF autodiff of the
        # reference's sigmoid also rounds p before p(1 - p) (both as in test_gradients.py).
        floor = None
        if implementation == "reference":
            prob = types.SimpleNamespace(logits=x, weights=p["weights"], data_format=p[
                "data_format"], pos_weight=p["pos_weight"])
            floor = naive_rounding_floor(prob, upstream, check.COMPUTE_EPS[dtype])
        check.grad(grad, expected_grad, scale, dtype, extra_rtol=3 * rtol + 8 * 2.0 ** -24,
                   floor=floor, what=f"{implementation} loss gradient")
