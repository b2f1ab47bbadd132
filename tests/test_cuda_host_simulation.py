"""The CUDA kernels' logic, run on the host (no GPU needed).

fused_segloss._core.simulate_cuda_stats / simulate_cuda_grad execute the kernels' own
__host__ __device__ code (csrc/cuda/segloss_cuda_thread.h) for every (block, thread) of the
launch the CUDA launcher would make, including the shared-memory tree of the block
reduction (its barriers are the only device-only part) and the second-stage combine.
They are compared with the CPU kernel (_core.stats / _core.logit_grad) and with the
independent float64 NumPy oracle, over launch shapes chosen to hit every path: several
chunks per row with a ragged last one, rows that start off a 4-element boundary, C = 1
and C = 100 (span mode), a C large and odd enough for column mode, both layouts, every
dtype pair, broadcast weights, pos_weight, squared, misaligned buffers (scalar loads).
"""
import numpy as np
import pytest

import numpy_reference as ref
from conftest import NUMPY_DTYPES, OUTPUT_ROUNDING

core = pytest.importorskip("fused_segloss._core")
if not hasattr(core, "simulate_cuda_stats"):
    pytest.skip("fused_segloss._core was built without the CUDA host simulation",
                allow_module_level=True)

LOGIT_DTYPES = ("float32", "float64", "float16", "bfloat16")
LABEL_DTYPES = ("float32", "float64", "float16", "bfloat16", "uint8", "bool")
# Columns that are integer counts when every weight is an integer (weight_sum and the
# three hard counts): float sums of integers below 2^24 are exact in any order, so the
# simulation must match the CPU kernel exactly. Catches elements visited twice or never.
COUNT_COLUMNS = [ref.WEIGHT_SUM, ref.HARD_TP, ref.HARD_PRED, ref.HARD_LABEL]


def make_case(rng, batch, positions, classes, channels_last, logits_dtype="float32",
              labels_dtype="float32", weights=None, pos_weight=False, misaligned=False):
    """Logits/labels as [B, N, C] or [B, C, N] plus a canonical weights view.

    weights: None or a string of three characters for (batch, positions, classes), each
    'f' (full) or '1' (broadcast), e.g. 'ff1' is a per-pixel map.
    """
    shape = (batch, positions, classes) if channels_last else (batch, classes, positions)
    x = rng.normal(0.0, 3.0, shape)
    x[rng.random(shape) < 0.05] = 0.0
    z = (rng.random(shape) < 0.4).astype(np.float64)
    if labels_dtype not in ("uint8", "bool"):
        soft = rng.random(shape) < 0.3
        z[soft] = rng.random(int(soft.sum()))
    x = as_dtype(x, logits_dtype, misaligned)
    z = as_dtype(z, labels_dtype, misaligned)
    w = None
    if weights is not None:
        full = dict(zip("bnc", (batch, positions, classes)))
        dims = [full[axis] if flag == "f" else 1 for axis, flag in zip("bnc", weights)]
        if not channels_last:
            dims = [dims[0], dims[2], dims[1]]
        w = rng.uniform(0.0, 2.0, dims).astype(np.float32)
        w[rng.random(dims) < 0.2] = 0.0
    pw = rng.uniform(0.5, 4.0, classes).astype(np.float32) if pos_weight else None
    return x, z, w, pw


def as_dtype(values, dtype, misaligned):
    out = values.astype(NUMPY_DTYPES[dtype])
    if not misaligned:
        return out
    # The same values one element into a fresh buffer: contiguous, but not aligned for
    # whole-group (vector) loads, so the kernel must take its scalar path.
    buffer = np.empty(out.size + 1, out.dtype)
    view = buffer[1:].reshape(out.shape)
    view[...] = out
    return view


def oracle_weights(w, x, channels_last):
    """The canonical weights view broadcast to the logits' shape (for the NumPy oracle)."""
    return None if w is None else np.broadcast_to(w, x.shape)


def data_format(channels_last):
    return "channels_last" if channels_last else "channels_first"


def check_stats(x, z, w, pw, channels_last, squared, check, **sim_options):
    simulated = core.simulate_cuda_stats(x, z, w, pw, channels_last=channels_last,
                                         squared=squared, **sim_options)
    cpu = core.stats(x, z, w, pw, channels_last=channels_last, squared=squared)
    dtype = check.dtype_name(x)
    expected = ref.stats(x, z, oracle_weights(w, x, channels_last), pw,
                         data_format(channels_last), squared)
    check.stats(simulated, expected, dtype, what="simulated CUDA stats vs NumPy")
    check.stats(simulated, cpu.astype(np.float64), dtype, what="simulated CUDA stats vs CPU")
    if w is None or np.array_equal(w, np.round(w)):
        np.testing.assert_array_equal(simulated[..., COUNT_COLUMNS], cpu[..., COUNT_COLUMNS])
    return simulated


def check_grad(x, z, w, pw, channels_last, squared, rng, check, **sim_options):
    grad_stats = rng.normal(0.0, 1.0, (x.shape[0], x.shape[-1] if channels_last else x.shape[1],
                                       8)).astype(np.float32)
    simulated = core.simulate_cuda_grad(x, z, w, pw, grad_stats, channels_last=channels_last,
                                        squared=squared, **sim_options)
    cpu = core.logit_grad(x, z, w, pw, grad_stats, channels_last=channels_last, squared=squared)
    fmt = data_format(channels_last)
    w_full = oracle_weights(w, x, channels_last)
    expected = ref.logit_grad(x, z, w_full, pw, grad_stats, fmt, squared)
    scale = ref.logit_grad_scale(x, z, w_full, pw, grad_stats, fmt, squared)
    dtype = check.dtype_name(x)
    check.grad(simulated, expected, scale, dtype, what="simulated CUDA gradient vs NumPy")
    # Against the CPU kernel: both evaluate the same per-element formula, which may differ
    # in the compute type's last bits (FMA contraction), and each rounds the result to the
    # logits' dtype once, so two float16/bfloat16 outputs can be one whole ulp apart
    # (twice the half-ulp OUTPUT_ROUNDING that check.grad already allows).
    check.grad(simulated, np.asarray(cpu, np.float64), scale, dtype,
               extra_rtol=check.COMPUTE_EPS[dtype] * 8 + OUTPUT_ROUNDING[dtype],
               what="simulated CUDA gradient vs CPU")


# (batch, positions, classes, channels_last): each shape documents the path it exercises.
SHAPES = [
    pytest.param(2, 40001, 1, True, id="CL-C1-3chunks-ragged-odd-row-start"),
    pytest.param(2, 301, 100, True, id="CL-C100-q25-3chunks"),
    pytest.param(3, 5003, 3, True, id="CL-C3-q3-2chunks"),
    pytest.param(2, 2051, 6, True, id="CL-C6-q3-lanes-mod-C"),
    pytest.param(2, 70, 1001, True, id="CL-C1001-column-mode-ragged-tile"),
    pytest.param(1, 20000, 3, False, id="CF-C3-2chunks"),
    pytest.param(2, 37, 100, False, id="CF-C100-short-odd-rows"),
    pytest.param(2, 16385, 1, False, id="CF-C1-one-element-last-chunk"),
    pytest.param(5, 1, 7, True, id="CL-rank0-spatial"),
    pytest.param(5, 1, 7, False, id="CF-rank0-spatial"),
]


@pytest.mark.parametrize("batch,positions,classes,channels_last", SHAPES)
def test_stats_and_grad_match_cpu_and_oracle(batch, positions, classes, channels_last, rng,
                                             check):
    x, z, w, pw = make_case(rng, batch, positions, classes, channels_last, weights="ff1",
                            pos_weight=True)
    check_stats(x, z, w, pw, channels_last, False, check)
    check_grad(x, z, w, pw, channels_last, False, rng, check)


@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("logits_dtype", LOGIT_DTYPES)
@pytest.mark.parametrize("labels_dtype", LABEL_DTYPES)
def test_every_dtype_pair(logits_dtype, labels_dtype, channels_last, rng, check):
    x, z, w, pw = make_case(rng, 2, 1031, 5, channels_last, logits_dtype, labels_dtype)
    check_stats(x, z, w, pw, channels_last, True, check)
    check_grad(x, z, w, pw, channels_last, True, rng, check)


@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("weights", ["fff", "ff1", "f11", "1f1", "11f", "111", "1ff", "f1f"])
def test_broadcast_weights(weights, channels_last, rng, check):
    x, z, w, pw = make_case(rng, 3, 2049, 5, channels_last, weights=weights, pos_weight=True)
    check_stats(x, z, w, pw, channels_last, False, check)
    check_grad(x, z, w, pw, channels_last, False, rng, check)


@pytest.mark.parametrize("positions,classes", [(300, 200), (40, 1001)],
                         ids=["span-q50", "column"])
def test_float64_plans(positions, classes, rng, check):
    """float64 compute uses at most 128 threads per block (its reduction tree is twice as
    wide per value): a different plan from float32 for the same shape."""
    plan = core.cuda_launch_plan(2, positions, classes, True, "float64")
    assert plan["threads"] <= 128
    x, z, w, pw = make_case(rng, 2, positions, classes, True, "float64", weights="1f1")
    check_stats(x, z, w, pw, True, True, check)
    check_grad(x, z, w, pw, True, True, rng, check)


@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("labels_dtype", ["float32", "uint8"])
def test_misaligned_buffers_and_forced_scalar_loads(labels_dtype, channels_last, rng, check):
    """Unaligned buffers make the launcher drop vector loads; vector_loads=False forces the
    scalar path on aligned ones. Both must give the aligned vector path's counts and sums."""
    args = (rng, 2, 3001, 3, channels_last, "float32", labels_dtype)
    x, z, w, pw = make_case(*args, weights="ff1")
    xm, zm, _, _ = make_case(np.random.default_rng(0), *args[1:], misaligned=True)
    xm[...], zm[...] = x, z
    assert xm.ctypes.data % 16 != 0
    vector = check_stats(x, z, w, pw, channels_last, False, check)
    for stats in (check_stats(xm, zm, w, pw, channels_last, False, check),
                  check_stats(x, z, w, pw, channels_last, False, check, vector_loads=False)):
        np.testing.assert_allclose(stats, vector, rtol=2e-6, atol=1e-30)
        np.testing.assert_array_equal(stats[..., COUNT_COLUMNS], vector[..., COUNT_COLUMNS])
    check_grad(xm, zm, w, pw, channels_last, False, rng, check)
    check_grad(x, z, w, pw, channels_last, False, rng, check, vector_loads=False)


@pytest.mark.parametrize("channels_last", [True, False])
def test_extreme_logits_and_empty_class(channels_last, rng, check):
    x, z, w, pw = make_case(rng, 2, 999, 4, channels_last, pos_weight=True)
    x[rng.random(x.shape) < 0.3] = 1e4
    x[rng.random(x.shape) < 0.3] = -1e4
    (z[..., 0] if channels_last else z[:, 0])[...] = 0.0
    stats = check_stats(x, z, w, pw, channels_last, True, check)
    assert np.isfinite(stats).all()
    check_grad(x, z, w, pw, channels_last, True, rng, check)


@pytest.mark.parametrize("shape", [(0, 5, 3), (2, 0, 3)], ids=["B=0", "N=0"])
@pytest.mark.parametrize("channels_last", [True, False])
def test_empty_inputs(shape, channels_last):
    b, n, c = shape
    x = np.zeros((b, n, c) if channels_last else (b, c, n), np.float32)
    stats = core.simulate_cuda_stats(x, x, channels_last=channels_last)
    np.testing.assert_array_equal(stats, np.zeros((b, c, 8), np.float32))
    grad = core.simulate_cuda_grad(x, x, grad_stats=np.ones((b, c, 8), np.float32),
                                   channels_last=channels_last)
    assert grad.shape == x.shape


@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("bad", ["label_above_one", "label_nan", "uint8_two", "weight_negative",
                                 "weight_inf"])
def test_invalid_values_report_the_cpu_message(bad, channels_last, rng):
    """The device counts invalid values like the CPU kernel and words them the same."""
    labels_dtype = "uint8" if bad == "uint8_two" else "float32"
    x, z, w, pw = make_case(rng, 2, 3001, 3, channels_last, "float32", labels_dtype,
                            weights="fff")
    flat_z, flat_w = z.reshape(-1), w.reshape(-1)
    where = rng.choice(flat_z.size, 7, replace=False)
    if bad.startswith("label") or bad == "uint8_two":
        flat_z[where] = {"label_above_one": 1.5, "label_nan": np.nan, "uint8_two": 2}[bad]
    else:
        flat_w[where] = {"weight_negative": -0.5, "weight_inf": np.inf}[bad]
    with pytest.raises(ValueError) as cpu_error:
        core.stats(x, z, w, pw, channels_last=channels_last)
    with pytest.raises(ValueError) as sim_error:
        core.simulate_cuda_stats(x, z, w, pw, channels_last=channels_last)
    assert str(sim_error.value) == str(cpu_error.value)
    assert "found 7 " in str(sim_error.value)


@pytest.mark.parametrize("logits_dtype,max_threads", [("float32", 256), ("float64", 128)])
def test_launch_plan_invariants(logits_dtype, max_threads):
    """What the kernels rely on, for every C up to 1100 and some large ones."""
    for classes in list(range(1, 1101)) + [2048, 4096, 4097, 65536]:
        for channels_last in (True, False):
            plan = core.cuda_launch_plan(3, 1000, classes, channels_last, logits_dtype)
            q = plan["thread_period"]
            assert 0 < plan["threads"] <= max_threads
            if plan["mode"] == "span":
                assert plan["lanes"] == 4 * plan["threads"]
                assert plan["threads"] % q == 0
                ratio = plan["threads"] // q
                assert ratio & (ratio - 1) == 0, "tree strides must be multiples of q"
                # no room left for a wider tree
                assert plan["threads"] * 2 > max_threads
                if channels_last:
                    assert plan["lanes"] % classes == 0, "a slot must keep its class"
                    assert (4 * q) % classes == 0
                else:
                    assert q == 1
                row = 1000 * classes if channels_last else 1000
                assert plan["chunks_per_row"] == -(-row // plan["chunk_length"])
            else:
                assert channels_last and classes // np.gcd(classes, 4) > max_threads
                assert plan["class_tiles"] == -(-classes // plan["threads"])
            rows = 3 if channels_last else 3 * classes
            assert plan["num_blocks"] == rows * plan["class_tiles"] * plan["chunks_per_row"]
            assert plan["partial_records"] == 3 * classes * plan["chunks_per_row"]


@pytest.mark.parametrize("batch,positions,classes", [(2, 5, 0), (-1, 5, 3), (2, -4, 3), (0, 0, 0)])
def test_launch_plan_is_total(batch, positions, classes):
    """The workspace size may be asked for before the shapes are validated: the plan of a
    degenerate or invalid shape must be an empty launch, not a hang or a huge grid."""
    for channels_last in (True, False):
        plan = core.cuda_launch_plan(batch, positions, classes, channels_last)
        assert plan["num_blocks"] == 0 and plan["partial_records"] == 0
        assert plan["threads"] >= 1
