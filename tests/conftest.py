"""Shared fixtures: quiet TF logs, a seeded rng, random problems and per-dtype tolerances."""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before anything imports TensorFlow

from typing import NamedTuple, Optional  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

STAT_NAMES = ("ce_sum", "weight_sum", "intersection", "pred_sum", "label_sum", "hard_tp",
              "hard_pred", "hard_label")
NUMPY_DTYPES = {"float16": np.float16, "bfloat16": tf.bfloat16.as_numpy_dtype,
                "float32": np.float32, "float64": np.float64, "uint8": np.uint8, "bool": bool}


class Problem(NamedTuple):
    logits: np.ndarray
    labels: np.ndarray
    weights: Optional[np.ndarray]
    pos_weight: Optional[np.ndarray]
    data_format: str
    squared: bool

    def args(self):
        """Positional and keyword arguments of fsl.segloss_stats and numpy_reference.stats."""
        return ((self.logits, self.labels, self.weights, self.pos_weight),
                {"data_format": self.data_format, "squared": self.squared})


def weights_shape(kind, batch, spatial, classes, channels_last):
    """The shape of a weights tensor of the given broadcast kind."""
    rank = 2 + len(spatial)
    ones = [1] * len(spatial)

    def layout(b, s, c):
        return [b, *s, c] if channels_last else [b, c, *s]

    shapes = {
        "pixel": layout(batch, spatial, 1),          # a per-pixel map / ignore mask
        "full": layout(batch, spatial, classes),     # per pixel and class
        "image": [batch] + [1] * (rank - 1),         # one weight per image
        "spatial": layout(1, spatial, 1),            # one map shared by the batch
        # per class: NumPy broadcasting aligns trailing axes, so channels_first needs [C, 1..]
        "class": [classes] if channels_last else [classes] + ones,
        "row": layout(batch, spatial[:1] + ones[1:], 1),  # partial spatial broadcast
        "scalar": [],
    }
    return shapes[kind]


def make_problem(rng, *, batch=2, spatial=(7,), classes=3, data_format="channels_last",
                 logits_dtype="float32", labels_dtype="float32", soft=False, weights=None,
                 pos_weight=False, squared=False, extreme=False, empty_class=False):
    channels_last = data_format == "channels_last"
    shape = [batch, *spatial, classes] if channels_last else [batch, classes, *spatial]
    x = rng.normal(0.0, 3.0, shape)
    x[rng.random(shape) < 0.05] = 0.0  # the hard-prediction boundary x > 0
    if extreme:
        x[rng.random(shape) < 0.3] = 1e4
        x[rng.random(shape) < 0.3] = -1e4
    if soft:
        z = rng.random(shape)
        z[rng.random(shape) < 0.05] = 0.5  # the hard-label boundary z >= 0.5
        z[rng.random(shape) < 0.1] = 1.0
        z[rng.random(shape) < 0.1] = 0.0
    else:
        z = (rng.random(shape) < 0.4).astype(np.float64)
    if empty_class:
        (z[..., 0] if channels_last else z[:, 0])[...] = 0.0
    w = None
    if weights is not None:
        w = rng.uniform(0.0, 2.0, weights_shape(weights, batch, list(spatial), classes,
                                                channels_last))
        w[rng.random(w.shape) < 0.2] = 0.0  # ignored elements
        w = w.astype(np.float32)
    pw = rng.uniform(0.5, 4.0, classes).astype(np.float32) if pos_weight else None
    return Problem(x.astype(NUMPY_DTYPES[logits_dtype]), z.astype(NUMPY_DTYPES[labels_dtype]),
                   w, pw, data_format, squared)


@pytest.fixture
def rng():
    return np.random.default_rng(20240611)


@pytest.fixture
def problem(rng):
    """problem(**options) -> a random Problem (see make_problem for the options)."""
    return lambda **options: make_problem(rng, **options)


# ----------------------------------------------------------------------------------------
# Tolerances. Inputs in float16/bfloat16 are rounded once, before both computations: the
# oracle reads the same rounded values, so input rounding is not part of any tolerance.
#
# Statistics (float32 output, every term >= 0, so a relative bound per entry is sound):
# - float64 logits: the kernel works in float64 and rounds once to float32 at the end,
#   so each entry is within 1 float32 ulp (2^-23 relative) of the exact float64 sum.
# - other logits are computed in float32: exp/log1p polynomials within a few ulp per
#   element, float32 accumulation over at most a few thousand terms per lane before the
#   float64 partial sums; the pure-TF reference sums float32 tensors with Eigen's tree
#   reduction. A relative 2e-5 (~170 float32 ulp) bounds both with room, and still
#   catches any wrong term (which changes a sum by far more).
STATS_RTOL = {"float64": 2.0 ** -23, "float32": 2e-5, "float16": 2e-5, "bfloat16": 2e-5}
# Sums of terms that underflow (p = sigmoid(-1e4) is 0, a kernel may flush it to ~1e-38).
STATS_ATOL = 1e-30

# Per-element gradients: error relative to the sum of the magnitudes of the terms that are
# added (numpy_reference.logit_grad_scale): the compute type's few-ulp error, plus the
# final rounding to the logits' dtype (half an ulp: 2^-11 float16, 2^-8 bfloat16), plus an
# absolute floor: float16's subnormal spacing (2^-24) below 6e-5; for float32 compute,
# 1e-30 admits a kernel that clamps exp(-|x|) at e^-87 ~ 1.6e-38 (a gradient that is 0 for
# x = ±1e4 comes out as ~1e-37 · w · g), far below anything a training step could see.
COMPUTE_RTOL = {"float64": 1e-12, "float32": 1e-5, "float16": 1e-5, "bfloat16": 1e-5}
OUTPUT_ROUNDING = {"float64": 0.0, "float32": 0.0, "float16": 2.0 ** -11, "bfloat16": 2.0 ** -8}
OUTPUT_ATOL = {"float64": 1e-300, "float32": 1e-30, "float16": 2.0 ** -24, "bfloat16": 1e-30}
COMPUTE_EPS = {"float64": 2.0 ** -52, "float32": 2.0 ** -23, "float16": 2.0 ** -23,
               "bfloat16": 2.0 ** -23}


def dtype_name(array):
    return tf.as_dtype(np.asarray(array).dtype).name


def assert_stats_close(actual, expected, logits_dtype, rtol=None, what="stats"):
    actual = np.asarray(actual, np.float64)
    rtol = STATS_RTOL[logits_dtype] if rtol is None else rtol
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    excess = np.abs(actual - expected) - (rtol * np.abs(expected) + STATS_ATOL)
    if (excess > 0).any() or not np.isfinite(actual).all():
        worst = np.unravel_index(np.argmax(np.where(np.isfinite(excess), excess, np.inf)),
                                 excess.shape)
        raise AssertionError(
            f"{what} differ beyond rtol={rtol:g} at {int((excess > 0).sum())} entries; worst "
            f"{worst} ({STAT_NAMES[worst[-1]]}): actual {actual[worst]!r} vs expected "
            f"{expected[worst]!r}")


def assert_grad_close(actual, expected, scale, logits_dtype, extra_rtol=0.0, floor=None,
                      what="gradient"):
    """|actual - expected| <= rtol * scale + atol per element, rtol for the dtype.

    extra_rtol widens for error already in the upstream gradient (e.g. a float32 combine);
    floor (per element) admits a naive evaluation's rounding of p to the compute type.
    """
    assert np.asarray(actual).dtype == np.dtype(NUMPY_DTYPES[logits_dtype]), \
        f"{what} dtype {np.asarray(actual).dtype} is not the logits' {logits_dtype}"
    actual = np.asarray(actual, np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    rtol = COMPUTE_RTOL[logits_dtype] + OUTPUT_ROUNDING[logits_dtype] + extra_rtol
    allowed = rtol * scale + OUTPUT_ATOL[logits_dtype]
    if floor is not None:
        allowed = allowed + floor
    excess = np.abs(actual - expected) - allowed
    if (excess > 0).any() or not np.isfinite(actual).all():
        worst = np.unravel_index(np.argmax(np.where(np.isfinite(excess), excess, np.inf)),
                                 excess.shape)
        raise AssertionError(
            f"{what} differs beyond rtol={rtol:g} at {int((excess > 0).sum())} of "
            f"{actual.size} elements; worst {worst}: actual {actual[worst]!r} vs expected "
            f"{expected[worst]!r} (scale {scale[worst]!r})")


def assert_loss_close(actual, expected, magnitude, rtol):
    """Scalars: |actual - expected| <= rtol * magnitude (magnitude: the size of the terms
    added, e.g. ce + 1 for ce + (1 - dice), so cancellation in 1 - dice is covered)."""
    actual = float(actual)
    assert np.isfinite(actual), actual
    assert abs(actual - expected) <= rtol * magnitude, \
        f"loss {actual!r} vs expected {expected!r} (allowed {rtol * magnitude:g})"


def stats_rtol(problem, implementation):
    """STATS_RTOL, widened for the pure-TF reference in float32: TF sums float32 tensors
    over strided axes one term after another, whose worst-case relative error for N
    non-negative terms is (N - 1) * 2^-24 (measured: 4e-5 for N = 33123)."""
    dtype = dtype_name(problem.logits)
    if implementation != "reference" or dtype == "float64":
        return STATS_RTOL[dtype]
    shape = problem.logits.shape
    spatial = shape[1:-1] if problem.data_format == "channels_last" else shape[2:]
    return max(STATS_RTOL[dtype], int(np.prod(spatial)) * 2.0 ** -24)


class Checks:
    """The assertion helpers above, handed to tests through the `check` fixture."""
    stats = staticmethod(assert_stats_close)
    grad = staticmethod(assert_grad_close)
    loss = staticmethod(assert_loss_close)
    dtype_name = staticmethod(dtype_name)
    stats_rtol = staticmethod(stats_rtol)
    COMPUTE_EPS = COMPUTE_EPS
    STATS_RTOL = STATS_RTOL


@pytest.fixture
def custom_calls(monkeypatch):
    """Records the targets of the XLA custom calls emitted while tracing (after the
    availability self-check, whose own custom calls are not recorded)."""
    from fused_segloss import _xla

    assert _xla.available(), _xla.unavailable_reason()
    emitted = []
    real_call = _xla._call

    def recording_call(target, *args, **kwargs):
        emitted.append(target)
        return real_call(target, *args, **kwargs)

    monkeypatch.setattr(_xla, "_call", recording_call)
    return emitted


@pytest.fixture(scope="session")
def check():
    return Checks


# ----------------------------------------------------------------------------------------
# The oracle matrix, sampled rather than crossed: every value of every factor
# (spatial rank 0-3, sizes 1/7/1023, C = 1/100, each logits and labels dtype, each weights
# broadcast kind, pos_weight, squared, soft labels, empty class, logits ±1e4, B = 0) appears
# in some row, each row mixes several, and every row runs in both layouts. Rows marked
# "items" are large enough that the kernel splits a row into several work items.
# Each row also names the combine options its total-loss checks use.
COMBINE_CHOICES = (
    {},
    {"dice_mode": "per_image"},
    {"empty": "exclude"},
    {"dice_mode": "per_image", "empty": "exclude", "smooth": 0.0},
    {"class_weights": "random", "ce_weight": 0.3, "dice_weight": 2.0},
    {"smooth": 1.0, "dice_weight": 0.5},
)


class OracleCase(NamedTuple):
    id: str
    problem: dict   # make_problem options (data_format included)
    combine: dict   # combine options ("random" class_weights are drawn per test)


_ROWS = [  # (spatial, C, B, logits, labels, extra options)
    ((), 5, 7, "float32", "float32", dict(soft=True)),
    ((), 1, 1, "float16", "bool", dict(weights="class", pos_weight=True)),
    ((1,), 3, 2, "bfloat16", "uint8", dict(weights="image", squared=True)),
    ((7,), 1, 3, "float64", "float64", dict(soft=True, weights="full", pos_weight=True,
                                           squared=True)),
    ((1023,), 3, 2, "float32", "uint8", dict(weights="pixel", extreme=True)),
    ((1023,), 100, 1, "float32", "float32", dict(soft=True, weights="spatial",
                                                 empty_class=True)),           # items
    ((1023,), 1, 3, "bfloat16", "float64", dict(soft=True, weights="spatial", pos_weight=True,
                                               extreme=True)),
    ((7,), 7, 0, "float32", "float32", dict(weights="pixel")),                 # B = 0
    ((7, 7), 100, 2, "float16", "float16", dict(soft=True, weights="full", pos_weight=True,
                                               extreme=True)),
    ((1, 7), 4, 2, "bfloat16", "bfloat16", dict(soft=True, weights="row", squared=True,
                                               empty_class=True)),
    ((7, 1023), 2, 2, "float32", "bool", dict(weights="row", pos_weight=True)),
    ((181, 183), 2, 1, "float16", "uint8", dict(extreme=True)),                # items
    ((7, 7), 1, 2, "float64", "bool", dict(weights="scalar", extreme=True, squared=True)),
    ((7, 7), 3, 1, "float32", "bool", dict(weights="full", empty_class=True, squared=True,
                                           extreme=True)),
    ((1, 1, 1), 1, 1, "float32", "float32", dict()),
    ((7, 1, 7), 3, 2, "float32", "float16", dict(soft=True, weights="row", pos_weight=True,
                                                squared=True)),
    ((3, 7, 5), 2, 2, "bfloat16", "float32", dict(soft=True, weights="pixel", extreme=True)),
    ((7, 7, 7), 5, 1, "float64", "uint8", dict(weights="class", empty_class=True)),
    ((5, 3, 7), 100, 1, "float16", "bool", dict(weights="image", pos_weight=True,
                                               squared=True)),
]


def _case_id(spatial, classes, batch, logits, labels, extra):
    flags = "-".join(f"{k}={v}" if not isinstance(v, bool) else k for k, v in extra.items())
    shape = "x".join(map(str, spatial)) or "scalar"
    return f"S{shape}-C{classes}-B{batch}-{logits}-{labels}" + (f"-{flags}" if flags else "")


ORACLE_CASES = [
    OracleCase(
        f"{data_format[9:]}-{_case_id(*row)}",
        dict(spatial=row[0], classes=row[1], batch=row[2], logits_dtype=row[3],
             labels_dtype=row[4], data_format=data_format, **row[5]),
        COMBINE_CHOICES[index % len(COMBINE_CHOICES)])
    for index, row in enumerate(_ROWS)
    for data_format in ("channels_last", "channels_first")
]


def pytest_generate_tests(metafunc):
    """Any test taking an `oracle_case` argument runs over ORACLE_CASES."""
    if "oracle_case" in metafunc.fixturenames:
        metafunc.parametrize("oracle_case", ORACLE_CASES, ids=[c.id for c in ORACLE_CASES])
