"""Softmax mode inside XLA: sparse class ids (labels of rank − 1) and the softmax
attributes reach the custom calls under one trace with dynamic shapes, the compiled HLO
holds no element-wise softmax, the modules are cached apart from sigmoid's, and bad ids
raise InvalidArgumentError under XLA as they do on the op path."""
import numpy as np
import pytest
import tensorflow as tf

import fused_segloss as fsl
from fused_segloss import _xla
from xla_helpers import ELEMENTWISE_CE_DICE, hlo_text, loss_and_grad_fn, small_inputs

pytestmark = pytest.mark.skipif(not fsl.fused_available(), reason="op library not built")

def _softmax_inputs(rng, shape=(3, 6, 5, 4), ignore_index=255):
    logits = rng.normal(0.0, 2.0, shape).astype(np.float32)
    ids = rng.integers(0, shape[-1], shape[:-1])
    ids[rng.random(ids.shape) < 0.2] = ignore_index
    return tf.constant(logits), tf.constant(ids.astype(np.uint8))


SOFTMAX_OPTIONS = dict(activation="softmax", ignore_index=255, focal_gamma=2.0,
                       include_background=False)


def test_softmax_sparse_labels_run_as_the_custom_call_with_dynamic_shapes(rng, custom_calls):
    specs = [tf.TensorSpec([None, None, None, 4], tf.float32),
             tf.TensorSpec([None, None, None], tf.uint8)]
    step = tf.function(loss_and_grad_fn(**SOFTMAX_OPTIONS), jit_compile=True,
                       input_signature=specs)
    eager = loss_and_grad_fn("fused", **SOFTMAX_OPTIONS)
    for shape in [(3, 6, 5, 4), (1, 2, 7, 4)]:
        logits, ids = _softmax_inputs(rng, shape)
        (loss, grad), (want_loss, want_grad) = step(logits, ids), eager(logits, ids)
        # The same kernels; only combine's float32 ops may be reordered by XLA.
        np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
        np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-9)
    assert step.experimental_get_tracing_count() == 1
    assert set(custom_calls) == {_xla.STATS_TARGET, _xla.GRAD_TARGET}


def test_softmax_hlo_has_no_elementwise_softmax(rng):
    logits, ids = _softmax_inputs(rng)
    hlo = hlo_text(tf.function(loss_and_grad_fn(**SOFTMAX_OPTIONS), jit_compile=True), logits, ids)
    assert 'custom_call_target="fused_segloss_stats"' in hlo
    assert not ELEMENTWISE_CE_DICE.findall(hlo), ELEMENTWISE_CE_DICE.findall(hlo)


def test_softmax_and_sigmoid_modules_are_cached_apart(rng):
    assert _xla.available()
    _xla._module.cache_clear()
    logits, labels = small_inputs(rng, (2, 6, 5, 3))
    tf.function(loss_and_grad_fn(), jit_compile=True)(logits, labels)
    tf.function(loss_and_grad_fn(activation="softmax"), jit_compile=True)(logits, labels)
    assert _xla._module.cache_info().currsize == 4  # stats and gradient, per activation


def test_softmax_class_id_errors_are_invalid_argument_errors_under_xla(rng):
    logits, ids = _softmax_inputs(rng)
    bad = tf.where(ids == 1, tf.constant(7, tf.uint8), ids)
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"`labels` class ids must lie in \[0, C\) = \[0, 4\)"):
        tf.function(loss_and_grad_fn(**SOFTMAX_OPTIONS), jit_compile=True)(logits, bad)
