"""What the bad-input batteries share (test_bad_input.py for every entry point,
test_bad_input_softmax.py for softmax mode's labels and options): the small inputs, one
wrapper per entry point, and the check that a case raises the expected error with a message
that names the argument and what was expected."""
from typing import Callable, NamedTuple, Tuple

import numpy as np
import pytest
import tensorflow as tf

import fused_segloss as fsl

IAE = tf.errors.InvalidArgumentError
STATIC_OR_DATA = (ValueError, IAE)  # a constant may be checked while tracing or at run time

_rng = np.random.default_rng(7)
X = _rng.normal(0.0, 2.0, (2, 4, 4, 3)).astype(np.float32)        # [B, H, W, C]
Z = (_rng.random((2, 4, 4, 3)) < 0.4).astype(np.float32)

LABELS_RANGE = ("`labels`", "must lie in [0, 1]")
WEIGHTS_RANGE = ("`weights`", "must be finite and >= 0")
POS_WEIGHT_RANGE = ("`pos_weight`", ">= 0")


class Case(NamedTuple):
    call: Callable[[], object]
    error: type
    fragments: Tuple[str, ...]  # the argument's name and the expectation, verbatim


def assert_clear_error(case):
    with pytest.raises(case.error) as info:
        result = case.call()
        # Errors raised lazily must surface when the value is read.
        tf.nest.map_structure(lambda t: np.asarray(t), result)
    message = str(info.value)
    missing = [fragment for fragment in case.fragments if fragment not in message]
    assert not missing, f"message lacks {missing}: {message[:1500]}"


def raw():
    if not fsl.fused_available():
        pytest.skip("the op library is not built")
    return fsl.ops.library()


def stats(*args, **kwargs):
    return fsl.segloss_stats(*args, **kwargs)


def reference(*args, **kwargs):
    return fsl.segloss_stats(*args, implementation="reference", **kwargs)


def xla(fn, *args):
    """fn(*args) inside tf.function(jit_compile=True)."""
    return tf.function(fn, jit_compile=True)(*args)


def dynamic(fn, *args, jit_compile=False):
    """fn(*args) traced with every dimension unknown (shapes only known at run time)."""
    specs = [tf.TensorSpec([None] * np.ndim(a), tf.as_dtype(np.asarray(a).dtype)) for a in args]
    return tf.function(fn, input_signature=specs, jit_compile=jit_compile)(*args)


def xla_dynamic(fn, *args):
    return dynamic(fn, *args, jit_compile=True)


def keras_loss(y_true, y_pred, sample_weight=None, **options):
    keras_module = pytest.importorskip("fused_segloss.keras",
                                       reason="fused_segloss.keras is not available")
    loss = keras_module.SegLoss(**options)
    return loss(y_true, y_pred, sample_weight=sample_weight)
