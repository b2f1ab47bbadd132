"""Valid edge cases next to the bad-input batteries: zero-size batch or spatial dims give
finite results equal to the float64 oracle's, on every path and for every combine mode;
strided, reversed, Fortran-ordered, byte-swapped or transposed-back inputs give results
bitwise equal to those of the contiguous copy (the TF paths and the pybind11 module)."""
import numpy as np
import pytest
import tensorflow as tf

import fused_segloss as fsl
from fused_segloss import _core

import numpy_reference

PATHS = ("fused", "reference", "xla")


def loss_stats_and_grad(path, x, z, w=None, pw=None, data_format="channels_last", **options):
    """(stats, total, d total / d logits) as NumPy arrays on one code path."""
    implementation = "reference" if path == "reference" else "auto"
    if path == "fused" and not fsl.fused_available():
        pytest.skip("the op library is not built")

    def run(x, z, w, pw):
        with tf.GradientTape() as tape:
            tape.watch(x)
            stats = fsl.segloss_stats(x, z, w, pw, data_format=data_format,
                                      implementation=implementation)
            total = fsl.combine(stats, **options).total
        return stats, total, tape.gradient(total, x)

    if path == "xla":
        run = tf.function(run, jit_compile=True)
    as_tensor = lambda a: None if a is None else tf.convert_to_tensor(a)  # noqa: E731
    return tuple(np.asarray(t) for t in run(as_tensor(x), as_tensor(z), as_tensor(w),
                                            as_tensor(pw)))


ZERO_SIZE_SHAPES = {  # (logits shape, weights shape), channels_last
    "batch-0": ((0, 5, 3), (0, 5, 1)),
    "batch-0-rank-0-spatial": ((0, 4), (0, 4)),
    "spatial-0": ((2, 0, 3), (2, 0, 3)),
    "one-of-three-spatial-0": ((2, 3, 0, 4, 2), (1, 3, 0, 4, 1)),
}
COMBINE_MODES = [dict(dice_mode=m, empty=e, smooth=s) for m in ("batch", "per_image")
                 for e in ("include", "exclude") for s in (1e-5, 0.0)]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shape_id", sorted(ZERO_SIZE_SHAPES))
@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
def test_zero_size_batch_or_spatial_dims_give_finite_results(path, shape_id, data_format):
    shape, w_shape = ZERO_SIZE_SHAPES[shape_id]
    if data_format == "channels_first":
        shape, w_shape = (shape[0], shape[-1], *shape[1:-1]), (w_shape[0], w_shape[-1],
                                                              *w_shape[1:-1])
    x = np.zeros(shape, np.float32)
    z = np.zeros(shape, np.float32)
    w = np.ones(w_shape, np.float32)
    classes = shape[-1] if data_format == "channels_last" else shape[1]
    pw = np.full(classes, 2.0, np.float32)
    expected_stats = numpy_reference.stats(x, z, w, pw, data_format)
    # combine is the same pure TF on every path: inside XLA (a compile per option set) two
    # opposite option sets suffice.
    modes = COMBINE_MODES if path != "xla" else [COMBINE_MODES[1], COMBINE_MODES[-1]]
    for options in modes:
        stats, total, grad = loss_stats_and_grad(path, x, z, w, pw, data_format, **options)
        assert stats.shape == (shape[0], classes, 8)
        np.testing.assert_array_equal(stats, expected_stats)
        expected_total = numpy_reference.combine(expected_stats, **options).total
        assert np.isfinite(total) and total == expected_total, (options, total)
        assert grad.shape == x.shape and np.isfinite(grad).all()


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
def test_zero_size_dims_in_core_module(data_format):
    channels_last = data_format == "channels_last"
    for shape in ((0, 6, 3), (2, 0, 3), (2, 4, 0, 3)):
        if not channels_last:
            shape = (shape[0], shape[-1], *shape[1:-1])
        x = np.zeros(shape, np.float32)
        z = np.ones(shape, np.uint8)
        classes = shape[-1] if channels_last else shape[1]
        stats = _core.stats(x, z, channels_last=channels_last, threads=3)
        np.testing.assert_array_equal(stats, numpy_reference.stats(x, z, data_format=data_format))
        grad = _core.logit_grad(x, z, grad_stats=np.ones((shape[0], classes, 8), np.float32),
                                channels_last=channels_last, threads=3)
        assert grad.shape == x.shape and grad.dtype == x.dtype


def _views(x):
    """Non-contiguous (or otherwise unusual) views of x with the same shape [B, H, W, C]."""
    big = np.zeros((x.shape[0], 2 * x.shape[1], x.shape[2] + 1, x.shape[3] + 2), x.dtype)
    big[:, ::2, 1:, 2:] = x
    reversed_buffer = np.ascontiguousarray(x[:, ::-1])
    return {
        "strided-slice": big[:, ::2, 1:, 2:],
        "negative-stride": reversed_buffer[:, ::-1],
        "fortran-order": np.asfortranarray(x),
        "big-endian": x.astype(x.dtype.newbyteorder(">")),
        "transposed-back": np.ascontiguousarray(np.moveaxis(x, -1, 1)).transpose(0, 2, 3, 1),
    }


VIEW_KINDS = sorted(_views(np.zeros((1, 1, 1, 1), np.float32)))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("view", VIEW_KINDS)
def test_non_contiguous_inputs_equal_the_contiguous_copy(path, view):
    rng = np.random.default_rng(11)
    x = rng.normal(0.0, 3.0, (2, 6, 5, 3)).astype(np.float32)
    z = rng.random((2, 6, 5, 3)).astype(np.float32)
    w = rng.uniform(0.0, 2.0, (2, 6, 5, 1)).astype(np.float32)
    pw = np.array([0.5, 1.0, 3.0], np.float32)
    expected = loss_stats_and_grad(path, x, z, w, pw)
    got = loss_stats_and_grad(path, _views(x)[view], _views(z)[view], _views(w)[view], pw)
    for name, a, b in zip(("stats", "total", "gradient"), got, expected):
        np.testing.assert_array_equal(a, b, err_msg=f"{name} of a {view} view")


@pytest.mark.parametrize("view", VIEW_KINDS)
@pytest.mark.parametrize("logits_dtype", [np.float32, np.float64, np.float16])
def test_non_contiguous_inputs_in_core_module(view, logits_dtype):
    rng = np.random.default_rng(12)
    x = rng.normal(0.0, 3.0, (2, 6, 5, 3)).astype(logits_dtype)
    z = (rng.random((2, 6, 5, 3)) < 0.5).astype(np.float32)
    w = rng.uniform(0.0, 2.0, (2, 30, 3)).astype(np.float32)   # canonical [B, N, C]
    w_view = {"strided-slice": np.repeat(w, 2, axis=1)[:, ::2], "negative-stride":
              np.ascontiguousarray(w[:, ::-1])[:, ::-1], "fortran-order": np.asfortranarray(w),
              "big-endian": w.astype(">f4"), "transposed-back":
              np.ascontiguousarray(w.transpose(0, 2, 1)).transpose(0, 2, 1)}[view]
    g = rng.normal(0.0, 1.0, (2, 3, 8)).astype(np.float32)
    g_strided = np.repeat(g, 2, axis=2)[..., ::2]
    xv, zv = _views(x)[view], _views(z)[view]
    np.testing.assert_array_equal(_core.stats(xv, zv, w_view), _core.stats(x, z, w))
    np.testing.assert_array_equal(_core.logit_grad(xv, zv, w_view, grad_stats=g_strided),
                                  _core.logit_grad(x, z, w, grad_stats=g))
