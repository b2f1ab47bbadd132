"""The softmax-mode CUDA kernels' logic, run on the host (no GPU needed).

fused_segloss._core.simulate_cuda_stats / simulate_cuda_grad with activation="softmax" run
the kernels' own __host__ __device__ code (csrc/cuda/segloss_cuda_softmax.h) for every
(block, thread) of the launch the CUDA launcher would make: the per-thread pixels, one
shared-memory tree per round of 4 classes, the block records and the second-stage combine.
They are compared with the independent float64 NumPy oracle (tests/numpy_softmax.py) and,
where the CPU core has softmax mode, with the CPU kernel. The shapes cover C = 1, 2, 21
and 150 (rounds with a ragged last one), both layouts, several blocks per image with a
ragged last block, dense and sparse labels, ignore_index, broadcast weights, squared and
the focal factor.
"""
import numpy as np
import pytest

import numpy_reference as ref
import numpy_softmax as oracle
from conftest import NUMPY_DTYPES, OUTPUT_ROUNDING

core = pytest.importorskip("fused_segloss._core")
if not hasattr(core, "simulate_cuda_stats"):
    pytest.skip("fused_segloss._core was built without the CUDA host simulation",
                allow_module_level=True)

LOGIT_DTYPES = ("float32", "float64", "float16", "bfloat16")
# Dense labels (the logits' shape) and sparse class ids (the logits' shape without C).
LABEL_KINDS = ("dense-float32", "dense-uint8", "sparse-uint8", "sparse-int32", "sparse-int64")
COUNT_COLUMNS = [ref.WEIGHT_SUM, ref.HARD_TP, ref.HARD_PRED, ref.HARD_LABEL]
IGNORE = 255  # fits every id dtype


def make_case(rng, batch, positions, classes, channels_last, logits_dtype="float32",
              labels="sparse-int32", weights=None, ignore=False, integer_logits=False):
    """Logits [B, N, C] / [B, C, N], labels, and weights in the canonical view.

    weights: None, "pixel" ([B, N, 1]) or "full" ([B, N, C]), in the layout's order.
    ignore: about 10% of the sparse ids are IGNORE (then ignore_index=IGNORE is passed).
    integer_logits: small integers, so that the argmax has ties.
    """
    shape = (batch, positions, classes) if channels_last else (batch, classes, positions)
    if integer_logits:
        x = rng.integers(-2, 3, shape).astype(np.float64)
    else:
        x = rng.normal(0.0, 3.0, shape)
    x = x.astype(NUMPY_DTYPES[logits_dtype])
    kind, dtype = labels.split("-")
    class_axis = -1 if channels_last else 1
    if kind == "sparse":
        z = rng.integers(0, classes, (batch, positions))
        if ignore:
            z[rng.random(z.shape) < 0.1] = IGNORE
        z = z.astype(dtype)
    else:
        ids = rng.integers(0, classes, (batch, positions))
        one_hot = np.eye(classes)[ids]  # [B, N, C]
        if dtype != "uint8":  # a third of the pixels get a soft distribution
            soft = oracle.softmax(rng.normal(0.0, 1.0, one_hot.shape))
            one_hot = np.where(rng.random((batch, positions, 1)) < 0.3, soft, one_hot)
        z = np.ascontiguousarray(np.moveaxis(one_hot, -1, class_axis), NUMPY_DTYPES[dtype])
    w = None
    if weights is not None:
        dims = [batch, positions, classes if weights == "full" else 1]
        if not channels_last:
            dims = [dims[0], dims[2], dims[1]]
        w = rng.uniform(0.0, 2.0, dims).astype(np.float32)
        w[rng.random(dims) < 0.2] = 0.0
    return x, z, w


def options(channels_last, ignore=False, **extra):
    return dict(channels_last=channels_last, activation="softmax",
                ignore_index=IGNORE if ignore else None, **extra)


def oracle_args(x, w, channels_last, ignore=False, squared=False, focal_gamma=0.0):
    weights = None if w is None else np.broadcast_to(w, x.shape)
    return weights, dict(data_format="channels_last" if channels_last else "channels_first",
                         squared=squared, ignore_index=IGNORE if ignore else None,
                         focal_gamma=focal_gamma)


def check_stats(x, z, w, channels_last, check, ignore=False, squared=False, focal_gamma=0.0,
                rtol=None):
    simulated = core.simulate_cuda_stats(x, z, w, **options(channels_last, ignore,
                                                            squared=squared,
                                                            focal_gamma=focal_gamma))
    weights, kw = oracle_args(x, w, channels_last, ignore, squared, focal_gamma)
    expected = oracle.stats(x, z, weights, **kw)
    check.stats(simulated, expected, check.dtype_name(x), rtol=rtol,
                what="simulated CUDA softmax stats vs NumPy")
    if w is None or np.array_equal(w, np.round(w)):  # integer sums: exact in any order
        hard = np.array_equal(np.asarray(z, np.float64), np.round(np.asarray(z, np.float64)))
        columns = COUNT_COLUMNS if hard else COUNT_COLUMNS[1:]  # weight_sum = Σ w·z
        np.testing.assert_array_equal(simulated[..., columns], expected[..., columns])
    return simulated


def grad_scale(x, z, w, g, channels_last, ignore, squared, focal_gamma):
    """Per element, the magnitudes that dL/dx_j = u_j - p_j·Σ_c u_c adds up, with
    u_c = p_c·dL/dp_c and every part of dL/dp_c taken in magnitude (a tolerance relative
    to it covers cancellation without hiding an error in a large term)."""
    weights, kw = oracle_args(x, w, channels_last, ignore, squared, focal_gamma)
    xs, zs, ws = oracle.elements(x, z, weights, kw["data_format"], kw["ignore_index"])
    p = oracle.softmax(xs)
    gamma, k = focal_gamma, 2.0 if squared else 1.0
    with np.errstate(divide="ignore", invalid="ignore"):
        first = np.where(p < 1.0, gamma * (1.0 - p) ** (gamma - 1.0) * -np.log(p), 0.0)
    d_ce = first + (1.0 - p) ** gamma / p
    g = np.abs(np.asarray(g, np.float64))[:, None]
    d_p = ws * (g[..., ref.CE_SUM] * zs * d_ce + g[..., ref.INTERSECTION] * zs +
                g[..., ref.PRED_SUM] * k * p ** (k - 1.0))
    u = p * d_p
    scale = u + p * u.sum(axis=-1, keepdims=True)
    scale = scale.reshape((x.shape[0], -1, xs.shape[-1]))
    return scale if channels_last else np.swapaxes(scale, 1, 2)


def check_grad(x, z, w, channels_last, rng, check, ignore=False, squared=False,
               focal_gamma=0.0, sample=None):
    """sample: compare only these positions with the oracle (it builds the full C x C
    Jacobian per pixel); the simulation still runs the whole launch."""
    batch = x.shape[0]
    classes = x.shape[-1] if channels_last else x.shape[1]
    g = rng.normal(0.0, 1.0, (batch, classes, 8)).astype(np.float32)
    simulated = core.simulate_cuda_grad(x, z, w, grad_stats=g,
                                        **options(channels_last, ignore, squared=squared,
                                                  focal_gamma=focal_gamma))
    assert simulated.dtype == x.dtype and simulated.shape == x.shape
    pos_axis = 1 if channels_last else 2
    if sample is not None:
        take = lambda a, axis: None if a is None else np.take(a, sample, axis=axis)  # noqa: E731
        x, simulated = take(x, pos_axis), take(simulated, pos_axis)
        z = take(z, 1 if z.ndim == 2 else pos_axis)
        if w is not None and w.shape[pos_axis] != 1:
            w = take(w, pos_axis)
    weights, kw = oracle_args(x, w, channels_last, ignore, squared, focal_gamma)
    expected = oracle.logit_grad(x, z, weights, g, **kw)
    scale = grad_scale(x, z, w, g, channels_last, ignore, squared, focal_gamma)
    dtype = check.dtype_name(x)
    # float32 compute: the normaliser and U are sums over C terms, each a few ulp off.
    extra = 0.0 if dtype == "float64" else 4e-6 * max(1.0, np.log2(classes))
    check.grad(simulated, expected, scale, dtype, extra_rtol=extra,
               what="simulated CUDA softmax gradient vs NumPy")
    return simulated


# (batch, positions, classes, channels_last): blocks cover 768 positions (float32
# compute: 256 threads x 3 pixels) or 384 (float64); rounds cover 4 classes.
SHAPES = [
    pytest.param(2, 2500, 1, True, id="CL-C1-3blocks-ragged"),
    pytest.param(2, 1537, 2, False, id="CF-C2-3blocks-one-pixel-last"),
    pytest.param(3, 1100, 21, True, id="CL-C21-ragged-round"),
    pytest.param(2, 1030, 21, False, id="CF-C21"),
    pytest.param(2, 1500, 150, True, id="CL-C150"),
    pytest.param(1, 1100, 150, False, id="CF-C150"),
    pytest.param(5, 1, 7, True, id="CL-rank0-spatial"),
    pytest.param(3, 37, 4, False, id="CF-short-rows"),
]


@pytest.mark.parametrize("batch,positions,classes,channels_last", SHAPES)
def test_shapes_sparse_ignore_pixel_weights(batch, positions, classes, channels_last, rng,
                                            check):
    x, z, w = make_case(rng, batch, positions, classes, channels_last, weights="pixel",
                        ignore=True)
    check_stats(x, z, w, channels_last, check, ignore=True)
    sample = None if positions * classes ** 2 < 2e5 else rng.choice(positions, 40, False)
    check_grad(x, z, w, channels_last, rng, check, ignore=True, sample=sample)


@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("classes", [2, 21])
def test_dense_soft_labels_full_weights(classes, channels_last, rng, check):
    x, z, w = make_case(rng, 2, 1300, classes, channels_last, labels="dense-float32",
                        weights="full")
    check_stats(x, z, w, channels_last, check)
    check_grad(x, z, w, channels_last, rng, check, sample=rng.choice(1300, 200, False))


@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("labels", LABEL_KINDS)
@pytest.mark.parametrize("logits_dtype", LOGIT_DTYPES)
def test_every_dtype(logits_dtype, labels, channels_last, rng, check):
    x, z, w = make_case(rng, 2, 600, 5, channels_last, logits_dtype, labels)
    check_stats(x, z, w, channels_last, check, squared=True)
    check_grad(x, z, w, channels_last, rng, check, squared=True)


@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("weights", [None, "pixel", "full"])
@pytest.mark.parametrize("labels", ["sparse-int64", "dense-uint8"])
def test_weights(labels, weights, channels_last, rng, check):
    x, z, w = make_case(rng, 2, 1100, 6, channels_last, labels=labels, weights=weights)
    check_stats(x, z, w, channels_last, check)
    check_grad(x, z, w, channels_last, rng, check)


@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("squared", [False, True])
@pytest.mark.parametrize("logits_dtype", ["float32", "float64"])
def test_focal_gamma_2(logits_dtype, squared, channels_last, rng, check):
    x, z, w = make_case(rng, 2, 1100, 21, channels_last, logits_dtype, weights="pixel",
                        ignore=True)
    # (1 - p)^gamma from a float32 p loses its relative accuracy as p -> 1; those terms are
    # tiny, so the sums stay close, but not to 2e-5.
    rtol = None if logits_dtype == "float64" else 1e-4
    check_stats(x, z, w, channels_last, check, ignore=True, squared=squared, focal_gamma=2.0,
                rtol=rtol)
    check_grad(x, z, w, channels_last, rng, check, ignore=True, squared=squared,
               focal_gamma=2.0, sample=rng.choice(1100, 200, False))


def test_focal_gamma_0_is_plain_bit_for_bit(rng):
    x, z, w = make_case(rng, 2, 1100, 5, True, weights="pixel")
    g = rng.normal(0.0, 1.0, (2, 5, 8)).astype(np.float32)
    for focal in ({}, {"focal_gamma": 0.0}):
        np.testing.assert_array_equal(
            core.simulate_cuda_stats(x, z, w, **options(True, **focal)),
            core.simulate_cuda_stats(x, z, w, **options(True)))
        np.testing.assert_array_equal(
            core.simulate_cuda_grad(x, z, w, grad_stats=g, **options(True, **focal)),
            core.simulate_cuda_grad(x, z, w, grad_stats=g, **options(True)))


@pytest.mark.parametrize("channels_last", [True, False])
def test_argmax_ties_and_integer_counts_are_exact(channels_last, rng, check):
    """Integer logits tie often (the lowest index wins, as tf.argmax); integer weights make
    every count column an exact sum, so a pixel visited twice or never shows."""
    x, z, w = make_case(rng, 3, 2100, 7, channels_last, weights="pixel", ignore=True,
                        integer_logits=True)
    w = np.round(w * 2.0)
    stats = check_stats(x, z, w, channels_last, check, ignore=True)
    assert stats[..., ref.HARD_PRED].sum() > 0


@pytest.mark.parametrize("channels_last", [True, False])
def test_extreme_logits(channels_last, rng, check):
    """±1e4: stats finite and right, the gradient finite (the oracle's own gradient is
    0·inf there, where a float64 p underflows). ±60: every float32 p below e^-87 is 0 in
    the kernel but not in the float64 oracle, whose gradient is then compared."""
    x, z, w = make_case(rng, 2, 999, 4, channels_last, "float32", "dense-float32")
    x[rng.random(x.shape) < 0.3] = 1e4
    x[rng.random(x.shape) < 0.3] = -1e4
    stats = check_stats(x, z, w, channels_last, check)
    assert np.isfinite(stats).all()
    g = rng.normal(0.0, 1.0, (2, 4, 8)).astype(np.float32)
    grad = core.simulate_cuda_grad(x, z, w, grad_stats=g, **options(channels_last))
    assert np.isfinite(grad).all()
    x = np.clip(x, -60.0, 60.0)
    check_stats(x, z, w, channels_last, check)
    check_grad(x, z, w, channels_last, rng, check)


@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("id_dtype,ignore", [("int32", True), ("int64", False), ("uint8", True)])
def test_invalid_class_ids(id_dtype, ignore, channels_last, rng, check):
    """Ids outside [0, C) that are not ignore_index: a ValueError naming `labels`, C, how
    many and their range; the gradient treats them as ignored pixels (no out-of-bounds
    read)."""
    x, z, w = make_case(rng, 2, 3001, 5, channels_last, labels="sparse-" + id_dtype,
                        weights="pixel", ignore=ignore)
    flat = z.reshape(-1)
    where = rng.choice(flat.size, 6, replace=False)
    bad = [5, 7, 9, 200, 5, 6] if id_dtype == "uint8" else [-3, 5, 9, -1, 1 << 40, 7]
    if id_dtype == "int32":
        bad[4] = 1 << 30
    flat[where] = bad
    with pytest.raises(ValueError) as error:
        core.simulate_cuda_stats(x, z, w, **options(channels_last, ignore))
    message = str(error.value)
    assert "`labels`" in message and "[0, 5)" in message and "found 6 " in message, message
    assert f"from {min(bad)} to {max(bad)}" in message, message
    assert ("ignore_index = 255" in message) == ignore, message
    # Gradient: exactly the pixels' gradient with those ids ignored.
    fixed = z.copy()
    fixed.reshape(-1)[where] = IGNORE
    g = rng.normal(0.0, 1.0, (2, 5, 8)).astype(np.float32)
    simulated = core.simulate_cuda_grad(x, z, w, grad_stats=g, **options(channels_last, ignore))
    expected = core.simulate_cuda_grad(x, fixed, w, grad_stats=g, **options(channels_last, True))
    np.testing.assert_array_equal(simulated, expected)


@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("bad", ["label_above_one", "label_nan", "uint8_two", "weight_negative",
                                 "weight_inf"])
def test_invalid_dense_labels_and_weights(bad, channels_last, rng):
    """Counted per element and worded like the sigmoid kernels (InvalidValuesMessage)."""
    labels = "dense-uint8" if bad == "uint8_two" else "dense-float32"
    x, z, w = make_case(rng, 2, 1500, 3, channels_last, labels=labels, weights="full")
    flat_z, flat_w = z.reshape(-1), w.reshape(-1)
    where = rng.choice(flat_z.size, 7, replace=False)
    if bad in ("label_above_one", "label_nan", "uint8_two"):
        flat_z[where] = {"label_above_one": 1.5, "label_nan": np.nan, "uint8_two": 2}[bad]
        expected = "`labels` must lie in [0, 1]"
    else:
        flat_w[where] = {"weight_negative": -0.5, "weight_inf": np.inf}[bad]
        expected = "`weights` must be finite and >= 0"
    with pytest.raises(ValueError, match="found 7 ") as error:
        core.simulate_cuda_stats(x, z, w, **options(channels_last))
    assert expected in str(error.value)


def test_launch_plan():
    """One thread per pixel, 3 pixels per thread, rounds of 4 classes; the launcher's
    workspace holds B·C·blocks-per-image records."""
    for dtype, threads in (("float32", 256), ("float64", 128)):
        for classes in (1, 2, 4, 5, 21, 150, 4097):
            for positions in (1, 767, 768, 769, 40000):
                plan = core.cuda_launch_plan(3, positions, classes, False, dtype, "softmax")
                assert plan["mode"] == "softmax" and plan["threads"] == threads
                assert plan["chunk_length"] == 3 * threads
                assert plan["chunks_per_row"] == -(-positions // (3 * threads))
                assert plan["class_tiles"] == -(-classes // 4)
                assert plan["num_blocks"] == 3 * plan["chunks_per_row"]
                assert plan["partial_records"] == 3 * classes * plan["chunks_per_row"]
    empty = core.cuda_launch_plan(0, 5, 0, True, "float32", "softmax")
    assert empty["num_blocks"] == 0 and empty["partial_records"] == 0


@pytest.mark.parametrize("shape", [(0, 5, 3), (2, 0, 3)], ids=["B=0", "N=0"])
def test_empty_inputs(shape):
    b, n, c = shape
    x = np.zeros((b, n, c), np.float32)
    ids = np.zeros((b, n), np.int32)
    stats = core.simulate_cuda_stats(x, ids, **options(True))
    np.testing.assert_array_equal(stats, np.zeros((b, c, 8), np.float32))
    grad = core.simulate_cuda_grad(x, ids, grad_stats=np.ones((b, c, 8), np.float32),
                                   **options(True))
    assert grad.shape == x.shape


# ------------------------------------------------------------------------------------
# Against the CPU kernel, where the core has softmax mode (written alongside; until then
# core.stats ignores activation="softmax" and these are skipped).

def _cpu_has_softmax():
    x = np.array([[[1.0, 2.0, 3.0]]], np.float32)
    z = np.array([[[0.0, 0.0, 1.0]]], np.float32)
    try:
        cpu = core.stats(x, z, activation="softmax")
    except (TypeError, ValueError, RuntimeError):
        return False
    return np.allclose(cpu, oracle.stats(x, z), rtol=1e-5, atol=1e-7)


@pytest.mark.skipif(not _cpu_has_softmax(), reason="the CPU core has no softmax mode yet")
@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("labels,classes,logits_dtype", [
    ("sparse-int32", 21, "float32"), ("sparse-uint8", 150, "bfloat16"),
    ("dense-float32", 2, "float16"), ("sparse-int64", 5, "float64"), ("dense-uint8", 1, "float32")])
def test_matches_cpu_core(labels, classes, logits_dtype, channels_last, rng, check):
    sparse = labels.startswith("sparse")
    x, z, w = make_case(rng, 2, 1500, classes, channels_last, logits_dtype, labels,
                        weights="pixel", ignore=sparse)
    w = np.round(w * 2.0)  # integer weights: count columns must agree exactly
    kw = options(channels_last, sparse, squared=True)
    simulated = core.simulate_cuda_stats(x, z, w, **kw)
    cpu = core.stats(x, z, w, **kw)
    dtype = check.dtype_name(x)
    check.stats(simulated, cpu.astype(np.float64), dtype, what="simulated CUDA vs CPU stats")
    # weight_sum = Σ w·z is a count only for 0/1 labels (dense float labels here are soft)
    counts = COUNT_COLUMNS if labels != "dense-float32" else COUNT_COLUMNS[1:]
    np.testing.assert_array_equal(simulated[..., counts], cpu[..., counts])
    g = rng.normal(0.0, 1.0, (2, classes, 8)).astype(np.float32)
    sim_grad = core.simulate_cuda_grad(x, z, w, grad_stats=g, **kw)
    cpu_grad = core.logit_grad(x, z, w, grad_stats=g, **kw)
    scale = grad_scale(x, z, w, g, channels_last, sparse, True, 0.0)
    # The same formula in the same compute type, summed in possibly different orders; each
    # rounds once to the logits' dtype, so float16/bfloat16 may be one whole ulp apart.
    check.grad(sim_grad, np.asarray(cpu_grad, np.float64), scale, dtype,
               extra_rtol=check.COMPUTE_EPS[dtype] * 8 * classes + OUTPUT_ROUNDING[dtype],
               what="simulated CUDA vs CPU gradient")


@pytest.mark.skipif(not _cpu_has_softmax(), reason="the CPU core has no softmax mode yet")
@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("bad", ["ids", "ids_no_ignore", "pixel_weight", "dense_label"])
def test_invalid_values_match_cpu_core(bad, channels_last, rng):
    """The same message as the CPU kernel, counts included (weights are counted per
    element of their broadcast view, as in sigmoid mode)."""
    labels = "dense-float32" if bad == "dense_label" else "sparse-int64"
    ignore = bad != "ids_no_ignore" and labels.startswith("sparse")
    x, z, w = make_case(rng, 2, 1500, 5, channels_last, labels=labels, weights="pixel",
                        ignore=ignore)
    where = rng.choice(z.size, 4, replace=False)
    if bad.startswith("ids"):
        z.reshape(-1)[where] = [-4, 5, 17, 5]
    elif bad == "dense_label":
        z.reshape(-1)[where] = 1.5
    else:
        w.reshape(-1)[where[:2] % w.size] = -1.0
    kw = options(channels_last, ignore)
    with pytest.raises(ValueError) as cpu_error:
        core.stats(x, z, w, **kw)
    with pytest.raises(ValueError) as sim_error:
        core.simulate_cuda_stats(x, z, w, **kw)
    assert str(sim_error.value) == str(cpu_error.value)
