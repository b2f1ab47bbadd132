"""What the XLA tests share (test_xla.py, test_xla_softmax.py, test_xla_fallback.py): a
loss-and-gradient function to jit-compile, small inputs, the compiled HLO text, and the
element-wise ops that must not appear in it when the custom call does the work. (The
fixture recording the emitted custom calls is conftest.custom_calls.)"""
import re

import numpy as np
import tensorflow as tf

import fused_segloss as fsl

# Element-wise ops the reference's CE / Dice terms lower to; none may remain when the
# custom call does the work.
ELEMENTWISE_CE_DICE = re.compile(r"\b(logistic|exponential|exponential-minus-one|log|"
                                 r"log-plus-one)\(")


def loss_and_grad_fn(implementation="auto", **options):
    """(logits, labels) -> (seg_loss, its gradient with respect to the logits)."""
    def loss_and_grad(logits, labels):
        with tf.GradientTape() as tape:
            tape.watch(logits)
            loss = fsl.seg_loss(logits, labels, implementation=implementation, **options)
        return loss, tape.gradient(loss, logits)
    return loss_and_grad


def small_inputs(rng, shape=(2, 6, 5, 3), labels_dtype=np.float32):
    logits = tf.constant(rng.normal(0.0, 2.0, shape).astype(np.float32))
    labels = tf.constant((rng.random(shape) < 0.4).astype(labels_dtype))
    return logits, labels


def hlo_text(jit_fn, *args):
    return jit_fn.experimental_get_compiler_ir(*args)(stage="hlo")
