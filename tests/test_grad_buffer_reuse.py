"""The CPU gradient kernel's reuse of idle output buffers (csrc/tf/gradient_buffer_cache.h).

A gradient buffer may be handed out again only once nobody else holds it: a gradient the
caller still references must never be overwritten by a later call, and a reused buffer must
hold exactly the new gradient. The problems are above the cache's 4 MiB threshold.
"""
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import fused_segloss as fsl

SHAPE = (4, 256, 256, 5)  # 5.2 MB of float32 logits


def _inputs(seed):
    rng = np.random.default_rng(seed)
    logits = tf.constant(rng.normal(0.0, 2.0, SHAPE).astype(np.float32))
    labels = tf.constant((rng.random(SHAPE) < 0.3).astype(np.float32))
    return logits, labels


def _gradient(logits, labels, implementation):
    with tf.GradientTape() as tape:
        tape.watch(logits)
        loss = fsl.seg_loss(logits, labels, implementation=implementation)
    return tape.gradient(loss, logits)


def _address(tensor):
    return np.asarray(tensor).__array_interface__["data"][0]


def _expected(seeds):
    return {s: _gradient(*_inputs(s), "reference").numpy() for s in seeds}


def test_gradients_still_held_are_never_overwritten():
    seeds = [11, 12, 13, 14]
    expected = _expected(seeds)
    held = [_gradient(*_inputs(s), "fused") for s in seeds]  # more than the cache's slots
    assert len({_address(g) for g in held}) == len(held)
    for seed, grad in zip(seeds, held):
        np.testing.assert_allclose(grad.numpy(), expected[seed], rtol=1e-4, atol=1e-9)


def test_released_buffer_is_reused_and_holds_the_new_gradient():
    seeds = [21, 22, 23]
    expected = _expected(seeds)
    inputs = {s: _inputs(s) for s in seeds}
    first = _gradient(*inputs[seeds[0]], "fused")
    np.testing.assert_allclose(first.numpy(), expected[seeds[0]], rtol=1e-4, atol=1e-9)
    addresses = {_address(first)}
    del first
    for seed in seeds[1:]:
        grad = _gradient(*inputs[seed], "fused")
        np.testing.assert_allclose(grad.numpy(), expected[seed], rtol=1e-4, atol=1e-9)
        addresses.add(_address(grad))
        del grad
    # Released every time, so one buffer (or the two slots') serves every call.
    assert len(addresses) <= 2


@pytest.mark.slow
def test_reuse_can_be_switched_off():
    # In a fresh process (the setting is read when TF creates the kernel): with reuse off,
    # a held gradient is still intact and the results are the same as with reuse on.
    code = (
        "import numpy as np, tensorflow as tf, fused_segloss as fsl\n"
        f"rng = np.random.default_rng(5); shape = {SHAPE}\n"
        "x = tf.constant(rng.normal(0, 2, shape).astype(np.float32))\n"
        "z = tf.constant((rng.random(shape) < 0.3).astype(np.float32))\n"
        "def grad(x):\n"
        "    with tf.GradientTape() as t:\n"
        "        t.watch(x); loss = fsl.seg_loss(x, z, implementation='fused')\n"
        "    return t.gradient(loss, x).numpy()\n"
        "a = grad(x); b = grad(x * 0.5)\n"
        "print(float(np.abs(a).sum()), float(np.abs(b).sum()))\n")
    sums = []
    for setting in ("0", "1"):
        env = {**__import__("os").environ, "FUSED_SEGLOSS_REUSE_GRAD_BUFFERS": setting,
               "TF_CPP_MIN_LOG_LEVEL": "2"}
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env=env, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        sums.append([float(v) for v in out.stdout.split()[-2:]])
    assert sums[0] == sums[1]


@pytest.mark.parametrize("dtype", [tf.bfloat16, tf.float16])
def test_reuse_keeps_dtypes_apart(dtype):
    logits, labels = _inputs(31)
    grad32 = _gradient(logits, labels, "fused")
    del grad32
    low = tf.cast(logits, dtype)
    got = _gradient(low, labels, "fused")
    assert got.dtype == dtype
    want = _gradient(tf.cast(low, tf.float32), labels, "reference")
    # Per-element gradients are ~1e-6 (mean over 1.3M elements): in float16 that is the
    # subnormal range, spaced 2^-24 = 6e-8, so rounding alone can be 3e-8 absolute.
    np.testing.assert_allclose(tf.cast(got, tf.float32).numpy(), want.numpy(), rtol=2e-2,
                               atol=6e-8)
