"""seg_loss_result called eagerly on the fused path: the op and `combine` as traced calls.

Eagerly, `segloss_stats` followed by `combine` is an op dispatch, a traced `combine` call,
and under a GradientTape the backward of each: a fixed cost of about 4 ms per step on the CI
machine (64² images: 5.8 ms eager against 1.7 ms in tf.function), a third of the step at
256². Here instead:
- no tape watching: one traced call (the op and `combine`);
- under a tape: one traced call that also returns d total / d stats (and d total / d
  class_weights), recorded on the tape as one operation whose backward is the fused
  gradient op fed with that Jacobian times the upstream gradient of `total`. TF's own
  gradient of a traced call (a forward function with extra outputs, then a backward
  function call) cost about 1.5 ms more per step at 64² (measured, Zen 4). When a caller
  differentiates the other result fields too (their upstream gradients are not all zero),
  the backward calls a traced vector-Jacobian product of `combine` instead.
The static checks (shapes, dtypes, option values) still run eagerly first, so bad input
raises the same ValueError before anything is traced. Options are static arguments, as in
`combine`: each distinct set of options and input shapes is traced once (see _function_for).
`tensorflow.python.eager.record` (the tape's recording API, as tf.custom_gradient uses it)
is private to TF: this module is its only user, and tests/test_eager_fused.py checks it.
"""

import numpy as np
import tensorflow as tf
from tensorflow.python.eager import record

from . import _inputs, ops
from .combine import SegLossResult, _combine_tensors, check_options, class_weight_vector


def applicable(options):
    """Eager, fused op chosen, no numerics check (that path adds its own op), and the
    numeric options plain numbers (a tensor option, e.g. a scheduled ce_weight, takes the
    op-by-op path, which passes it as a tensor instead of tracing its value)."""
    if not tf.executing_eagerly() or options.get("check_numerics", False) is not False:
        return False
    if any(isinstance(options.get(name), (tf.Tensor, tf.Variable))
           for name in ("ce_weight", "dice_weight", "smooth")):
        return False
    return ops._choose_path(options.get("implementation", "auto")) == "fused"


def _stats(logits, labels, weights, pos_weight, options):
    data_format, squared = options[:2]
    return ops.library().fused_segloss_stats(logits, labels, weights, pos_weight,
                                             data_format=data_format, squared=squared)


def _result_tensors(logits, labels, weights, pos_weight, class_weights, options):
    stats = _stats(logits, labels, weights, pos_weight, options)
    return tuple(_combine_tensors(stats, class_weights, *options[2:]))


def _result_and_jacobian(logits, labels, weights, pos_weight, class_weights, options):
    """The 6 result fields, the stats, and d total / d stats, d total / d class_weights."""
    stats = _stats(logits, labels, weights, pos_weight, options)
    with tf.GradientTape() as tape:
        tape.watch([stats, class_weights])
        result = _combine_tensors(stats, class_weights, *options[2:])
    d_stats, d_class_weights = tape.gradient(
        result.total, [stats, class_weights],
        unconnected_gradients=tf.UnconnectedGradients.ZERO)
    return (*result, stats, d_stats, d_class_weights)


def _combine_vjp(stats, class_weights, options, *result_grads):
    with tf.GradientTape() as tape:
        tape.watch([stats, class_weights])
        result = _combine_tensors(stats, class_weights, *options[2:])
    return tape.gradient(list(result), [stats, class_weights], output_gradients=list(result_grads),
                         unconnected_gradients=tf.UnconnectedGradients.ZERO)


# One set of traced functions per set of options and input signature, taking only the
# tensors. Binding a call's arguments costs tf.function about 0.1 ms per argument here, so
# the seven options as arguments made each call ~0.5 ms slower (measured); and the cache
# keeps ConcreteFunctions, whose call skips tf.function's argument binding and trace lookup
# (64² images: forward 1.8 -> 1.3 ms, forward+backward 4.1 -> 3.8 ms, one interleaved run).
# Each function traces once, with the exact static shapes, as `combine`'s own traced
# function does: with shapes relaxed after a retrace, TF's graph optimiser rewrote the small
# reductions differently and the loss moved by 1 ulp against `combine(segloss_stats(...))`
# depending on which shapes a process had seen before. Bounded: a caller that varies shapes
# or an option every call (each new one traces anyway) cannot grow it without limit.
_MAX_FUNCTIONS = 64
_functions = {}


class _Traced:
    """The traced calls of one key, each traced on first use."""

    def __init__(self, options, tensors):
        self._options = options
        self._specs = [tf.TensorSpec(t.shape, t.dtype) for t in tensors]
        self._calls = {}

    def _get(self, name, body, specs):
        fn = self._calls.get(name)
        if fn is None:
            options = self._options
            traced = tf.function(lambda *args: body(*args, options), autograph=False)
            fn = self._calls[name] = traced.get_concrete_function(*specs)
        return fn

    def forward(self):
        return self._get("forward", _result_tensors, self._specs)

    def forward_for_tape(self):
        return self._get("forward_for_tape", _result_and_jacobian, self._specs)

    def vjp(self, stats, result):
        specs = [tf.TensorSpec(stats.shape, tf.float32), self._specs[-1]]
        specs += [tf.TensorSpec(t.shape, t.dtype) for t in result]
        return self._get("vjp", lambda s, cw, *rest: _combine_vjp(s, cw, rest[-1], *rest[:-1]),
                         specs)


def _function_for(options, tensors):
    key = (options, tuple((tuple(t.shape), t.dtype) for t in tensors))
    fn = _functions.get(key)
    if fn is None:
        if len(_functions) >= _MAX_FUNCTIONS:
            _functions.pop(next(iter(_functions)))
        fn = _functions[key] = _Traced(options, tensors)
    return fn


def _all_zero(tensors):
    # Reading a tiny eager tensor is a few microseconds; the tape passes zeros for result
    # fields that received no gradient.
    return all(g is None or not np.any(g._numpy()) for g in tensors)  # noqa: SLF001


def _recorded_result(traced, tensors, options):
    """The result, recorded on the active tape(s) as one operation of the five tensors."""
    logits, labels, weights, pos_weight, class_weights = tensors
    forward = traced.forward_for_tape()  # traced outside stop_recording: its inner tape records
    with record.stop_recording():
        *result, stats, d_stats, d_class_weights = forward(*tensors)

    def backward(*result_grads):
        d_total = result_grads[0]
        if tf.executing_eagerly() and _all_zero(result_grads[1:]):
            if d_total is None or float(d_total._numpy()) == 1.0:  # noqa: SLF001
                grad_stats, grad_class_weights = d_stats, d_class_weights
            else:
                grad_stats, grad_class_weights = d_stats * d_total, d_class_weights * d_total
        else:
            zeros = [tf.zeros_like(r) if g is None else g for g, r in zip(result_grads, result)]
            grad_stats, grad_class_weights = traced.vjp(stats, result)(stats, class_weights,
                                                                        *zeros)
        grad_logits = ops.library().fused_segloss_stats_grad(
            logits, labels, weights, pos_weight, grad_stats, data_format=options[0],
            squared=options[1])
        return [grad_logits, None, None, None, grad_class_weights]

    record.record_operation("FusedSeglossResult", result, list(tensors), backward)
    return result


# The constant inputs of the common case (no weights, no pos_weight, no class weights):
# creating them costs three eager ops per call, about a quarter of a small call's time.
# Eager tensors are immutable, so one of each is shared.
_constants = {}


def _constant(key, make):
    value = _constants.get(key)
    if value is None:
        value = _constants[key] = make()
    return value


def result(logits, labels, weights, pos_weight, *, data_format="channels_last", squared=False,
           implementation="auto", check_numerics=False, ce_weight=1.0, dice_weight=1.0,
           dice_mode="batch", smooth=1e-5, empty="include", class_weights=None):
    del implementation, check_numerics  # decided by applicable()
    p = _inputs.prepare(logits, labels, weights, pos_weight, data_format, squared)
    check_options(ce_weight, dice_weight, dice_mode, smooth, empty)
    classes = p.logits.shape[p.class_axis]
    cw = class_weight_vector(class_weights, classes)
    if cw is None:
        cw = _constant(("class_weights", classes), lambda: tf.ones([classes], tf.float32))
    weights = (_inputs.canonical_weights(p) if p.weights is not None else
               _constant("no_weights", lambda: _inputs.canonical_weights(p)))
    pos_weight = (_inputs.pos_weight_or_empty(p) if p.pos_weight is not None else
                  _constant("no_pos_weight", lambda: _inputs.pos_weight_or_empty(p)))
    options = (p.data_format, p.squared, ce_weight, dice_weight, dice_mode, smooth, empty)
    tensors = (p.logits, p.labels, weights, pos_weight, cw)
    traced = _function_for(options, tensors)
    if record.should_record_backprop(tensors):
        return SegLossResult(*_recorded_result(traced, tensors, options))
    return SegLossResult(*traced.forward()(*tensors))
