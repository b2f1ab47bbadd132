"""Oracle checks of an instrumented fused_segloss._core (run by scripts/run_sanitizers.sh).

    python scripts/sanitizer_oracle.py DIR_WITH_SANITIZED_CORE

Imports `_core` from DIR (built with ASan + UBSan) and tests/numpy_reference.py, never
TensorFlow: the point is to run the framework-free kernels under the sanitizers on every
code path (both layouts, every dtype pair, every canonical weight broadcast, pos_weight,
squared, several thread counts, sizes that straddle the kernels' block (at most 120 rows,
about 8192 elements: 1920 or 3840 for C = 1) and work-item (32768 elements) boundaries, empty batch/spatial dims, the CUDA kernels' host
simulation with aligned and misaligned buffers when it is built in, and the error paths).
Prints "SANITIZER ORACLE PASSED: <n> checks" on success; any mismatch raises.
"""
import itertools
import os
import sys

import ml_dtypes
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "..", "build-asan",
                                                                       "sanitized_pkg"))
sys.path.insert(1, os.path.join(HERE, "..", "tests"))

import _core  # noqa: E402  (the instrumented module)
import numpy_reference as ref  # noqa: E402

assert "tensorflow" not in sys.modules, "the sanitizer run must not load TensorFlow"

DTYPES = {"float32": np.float32, "float64": np.float64, "float16": np.float16,
          "bfloat16": ml_dtypes.bfloat16, "uint8": np.uint8, "bool": np.bool_}
# Statistics: float32 compute with float64 partial sums (2e-5 relative, the same bound as
# tests/conftest.py STATS_RTOL), float64 compute rounded once to float32.
STATS_RTOL = {"float64": 2.0 ** -23, "float32": 2e-5, "float16": 2e-5, "bfloat16": 2e-5}
# Gradients, relative to the sum of the magnitudes of the terms (numpy_reference.
# logit_grad_scale): compute-type error plus the final rounding to the logits' dtype.
GRAD_RTOL = {"float64": 1e-12, "float32": 1e-5, "float16": 1e-5 + 2.0 ** -11,
             "bfloat16": 1e-5 + 2.0 ** -8}
# The float32 exp polynomial returns ~2^-126 instead of underflowing to 0 for arguments
# below -87 (e.g. logits of +-1e4), so a term that is exactly 0 in float64 can come out as
# |g| * w * 3.3e-38 with |g| <= ~5 (normal draws) and w <= 2: an absolute 1e-36 covers it.
GRAD_ATOL = {"float64": 1e-300, "float32": 1e-36, "float16": 2.0 ** -24, "bfloat16": 1e-36}

rng = np.random.default_rng(7)
checks = 0
failures = []  # collected, not raised: every section still runs under the sanitizers


def expect(condition, what):
    global checks
    checks += 1
    if not condition:
        failures.append(what)


def make_inputs(batch, spatial, classes, channels_last, logits_dtype, labels_dtype):
    shape = [batch, *spatial, classes] if channels_last else [batch, classes, *spatial]
    x = rng.normal(0.0, 3.0, shape)
    x[rng.random(shape) < 0.05] = 0.0
    x[rng.random(shape) < 0.05] = 1e4
    x[rng.random(shape) < 0.05] = -1e4
    if labels_dtype in ("uint8", "bool"):
        z = rng.random(shape) < 0.4
    else:
        z = rng.random(shape)
        z[rng.random(shape) < 0.2] = 0.0
        z[rng.random(shape) < 0.2] = 1.0
    return x.astype(DTYPES[logits_dtype]), z.astype(DTYPES[labels_dtype])


def canonical_weights(kind, batch, positions, classes, channels_last):
    """(canonical [Bw, Nw, Cw] / [Bw, Cw, Nw] float32 view, or None) for a broadcast kind."""
    sizes = {"none": None, "full": (batch, positions, classes), "pixel": (batch, positions, 1),
             "image": (batch, 1, 1), "class": (1, 1, classes), "shared_map": (1, positions, 1),
             "scalar": (1, 1, 1)}[kind]
    if sizes is None:
        return None
    b, n, c = sizes
    w = rng.uniform(0.0, 2.0, (b, n, c) if channels_last else (b, c, n))
    w[rng.random(w.shape) < 0.2] = 0.0
    return w.astype(np.float32)


def dense_weights(w, logits_shape, spatial, channels_last):
    """The canonical view reshaped so that NumPy broadcasts it to the logits' shape."""
    if w is None:
        return None
    if channels_last:
        b, n, c = w.shape
        s = list(spatial) if n != 1 or not spatial else [1] * len(spatial)
        return w.reshape([b, *s, c])
    b, c, n = w.shape
    s = list(spatial) if n != 1 or not spatial else [1] * len(spatial)
    return w.reshape([b, c, *s])


def check_one(batch, spatial, classes, channels_last, logits_dtype, labels_dtype, weight_kind,
              with_pos_weight, squared, threads):
    global checks
    x, z = make_inputs(batch, spatial, classes, channels_last, logits_dtype, labels_dtype)
    positions = int(np.prod(spatial)) if spatial else 1
    w = canonical_weights(weight_kind, batch, positions, classes, channels_last)
    pw = rng.uniform(0.5, 4.0, classes).astype(np.float32) if with_pos_weight else None
    data_format = "channels_last" if channels_last else "channels_first"
    dense_w = dense_weights(w, x.shape, spatial, channels_last)

    stats = _core.stats(x, z, w, pw, channels_last=channels_last, squared=squared,
                        threads=threads)
    expected = ref.stats(x, z, dense_w, pw, data_format, squared)
    assert stats.dtype == np.float32 and stats.shape == expected.shape
    excess = np.abs(stats - expected) - (STATS_RTOL[logits_dtype] * np.abs(expected) + 1e-30)
    expect((excess <= 0).all(), ("stats", x.shape, data_format, logits_dtype, labels_dtype,
                                 weight_kind, threads, float(excess.max(initial=0.0))))

    grad_stats = rng.normal(0.0, 1.0, (batch, classes, 8)).astype(np.float32)
    grad = _core.logit_grad(x, z, w, pw, grad_stats, channels_last=channels_last,
                            squared=squared, threads=threads)
    expected_grad = ref.logit_grad(x, z, dense_w, pw, grad_stats, data_format, squared)
    scale = ref.logit_grad_scale(x, z, dense_w, pw, grad_stats, data_format, squared)
    assert grad.dtype == x.dtype and grad.shape == x.shape
    allowed = GRAD_RTOL[logits_dtype] * scale + GRAD_ATOL[logits_dtype]
    excess = np.abs(grad.astype(np.float64) - expected_grad) - allowed
    expect((excess <= 0).all(), ("grad", x.shape, data_format, logits_dtype, labels_dtype,
                                 weight_kind, threads, float(excess.max(initial=0.0))))


def expect_value_error(fragment, fn):
    try:
        fn()
    except ValueError as exc:
        expect(fragment in str(exc), ("error message", fragment, str(exc)))
        return
    expect(False, ("no ValueError", fragment))


# 1. The dtype matrix on a small problem, both layouts, every weight broadcast.
for (channels_last, logits_dtype, labels_dtype, weight_kind) in itertools.product(
        (True, False), ("float32", "float64", "float16", "bfloat16"),
        ("float32", "float64", "float16", "bfloat16", "uint8", "bool"),
        ("none", "full", "pixel", "image", "class", "shared_map", "scalar")):
    check_one(2, (3, 5), 3, channels_last, logits_dtype, labels_dtype, weight_kind,
              with_pos_weight=weight_kind in ("full", "class"), squared=weight_kind == "pixel",
              threads=1)

# 2. Shapes: every spatial rank, C = 1 / 17 (lane period lcm(C, 16)) / 100 (> 16 lanes),
#    sizes straddling the blocks (1920 or 3840 elements for C = 1, 2040 for C = 17) and
#    the 32768-element work item, several
#    thread counts (items split across threads differently).
SHAPES = [(1, (), 1), (3, (), 5), (2, (7,), 1), (1, (2049,), 1), (1, (3841,), 1), (2, (1025,), 3),
          (1, (33000,), 1), (2, (4100,), 17), (1, (3, 5, 7), 100), (2, (2, 3, 4), 16),
          (1, (17, 31), 7)]
for (batch, spatial, classes), channels_last in itertools.product(SHAPES, (True, False)):
    for weight_kind, threads in (("none", 1), ("full", 3), ("pixel", 2), ("class", 4)):
        check_one(batch, spatial, classes, channels_last, "float32", "float32", weight_kind,
                  with_pos_weight=threads == 3, squared=threads == 2, threads=threads)
    check_one(batch, spatial, classes, channels_last, "bfloat16", "uint8", "image",
              with_pos_weight=True, squared=True, threads=2)

# 3. Zero-size batch and spatial dims are valid and give zeros (no reads, no writes).
for channels_last in (True, False):
    check_one(0, (4,), 3, channels_last, "float32", "float32", "none", False, False, 2)
    check_one(2, (0,), 3, channels_last, "float32", "float32", "pixel", True, False, 2)
    check_one(2, (3, 0), 3, channels_last, "float16", "bool", "full", False, True, 1)

# 4. The CUDA kernels' host simulation (when built in): every (block, thread) of the launch
#    on the host, with contiguous and misaligned buffers (vector and scalar loads).
def misaligned(a):
    buffer = np.empty(a.size + 1, a.dtype)
    view = buffer[1:].reshape(a.shape)
    view[...] = a
    return view


if hasattr(_core, "simulate_cuda_stats"):
    for (batch, spatial, classes), channels_last, logits_dtype, shift in itertools.product(
            [(2, (7,), 1), (1, (2049,), 3), (2, (5, 3), 100), (1, (33, 9), 17), (0, (4,), 2)],
            (True, False), ("float32", "bfloat16", "float64"), (False, True)):
        x, z = make_inputs(batch, spatial, classes, channels_last, logits_dtype, "float32")
        if shift:
            x, z = misaligned(x), misaligned(z)
        positions = int(np.prod(spatial))
        w = canonical_weights("pixel" if shift else "full", batch, positions, classes,
                              channels_last)
        pw = rng.uniform(0.5, 4.0, classes).astype(np.float32)
        dense_w = dense_weights(w, x.shape, spatial, channels_last)
        fmt = "channels_last" if channels_last else "channels_first"
        for vector_loads in (True, False):
            got = _core.simulate_cuda_stats(x, z, w, pw, channels_last=channels_last,
                                            vector_loads=vector_loads)
            expected = ref.stats(x, z, dense_w, pw, fmt)
            excess = np.abs(got - expected) - (STATS_RTOL[logits_dtype] * np.abs(expected) + 1e-30)
            expect((excess <= 0).all(), ("simulated stats", x.shape, logits_dtype, vector_loads))
            g = rng.normal(0.0, 1.0, (batch, classes, 8)).astype(np.float32)
            grad = _core.simulate_cuda_grad(x, z, w, pw, g, channels_last=channels_last,
                                            vector_loads=vector_loads)
            expected_grad = ref.logit_grad(x, z, dense_w, pw, g, fmt)
            scale = ref.logit_grad_scale(x, z, dense_w, pw, g, fmt)
            allowed = GRAD_RTOL[logits_dtype] * scale + GRAD_ATOL[logits_dtype]
            expect((np.abs(grad.astype(np.float64) - expected_grad) <= allowed).all(),
                   ("simulated grad", x.shape, logits_dtype, vector_loads))
else:
    print("note: _core has no CUDA host simulation; section 4 skipped")

# 5. Error paths: each must raise ValueError (no out-of-bounds access while detecting it).
x, z = make_inputs(2, (5, 4), 3, True, "float32", "float32")
g = np.zeros((2, 3, 8), np.float32)
expect_value_error("`labels`", lambda: _core.stats(x, z * 2.0))
expect_value_error("`labels`", lambda: _core.stats(x, np.full_like(z, np.nan)))
expect_value_error("`labels`", lambda: _core.stats(x, (z > 0.5).astype(np.uint8) * 3))
expect_value_error("`weights`", lambda: _core.stats(x, z, -np.ones((2, 20, 3), np.float32)))
expect_value_error("`weights`", lambda: _core.stats(x, z, np.ones((2, 19, 3), np.float32)))
expect_value_error("`weights`", lambda: _core.stats(x, z, np.ones((3, 20, 3), np.float32)))
expect_value_error("`weights`", lambda: _core.stats(x, z, np.ones((2, 20, 3, 1), np.float32)))
expect_value_error("`weights`", lambda: _core.logit_grad(x, z, np.ones((2, 20, 2), np.float32),
                                                         grad_stats=g))
expect_value_error("`pos_weight`", lambda: _core.stats(x, z, None, np.ones(4, np.float32)))
expect_value_error("`grad_stats`", lambda: _core.logit_grad(x, z, grad_stats=g[:, :2]))
expect_value_error("`grad_stats`", lambda: _core.logit_grad(x, z, grad_stats=g.ravel()))
expect_value_error("`labels`", lambda: _core.stats(x, z[:, :4]))
expect_value_error("`logits`", lambda: _core.stats(x[0, 0, 0], z[0, 0, 0]))
expect_value_error("`logits`", lambda: _core.stats(x.astype(np.int32), z))
expect_value_error("C >= 1", lambda: _core.stats(x[..., :0], z[..., :0]))

if failures:
    print(f"SANITIZER ORACLE: {len(failures)} of {checks} checks FAILED (no sanitizer error):")
    for failure in failures:
        print("  ", failure)
    sys.exit(1)
print(f"SANITIZER ORACLE PASSED: {checks} checks")
