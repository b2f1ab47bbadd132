"""seg_loss_result called eagerly on the fused path: one op dispatch and one compiled call.

Eagerly, `segloss_stats` followed by `combine` is an op dispatch, a traced `combine` call,
and under a GradientTape TF's gradient of each: a fixed cost of 2-4 ms per step on the CI
machines, a third of the step at 256². Here instead:
- the fused op runs eagerly, and `combine` is one XLA-compiled call on the stats (a TF
  graph where this TensorFlow has no CPU JIT);
- under a tape, that call also returns d total / d stats (and d total / d class_weights),
  and the whole result is recorded on the tape as one operation whose backward is the
  fused gradient op fed with that Jacobian times the upstream gradient of `total`. When a
  caller differentiates the other result fields too (their upstream gradients are not all
  zero), the backward calls a traced vector-Jacobian product of `combine` instead.
Measured on Zen 4, 64² images, forward+backward: 2.4 ms with TF's gradient of one traced
call (op and combine), 1.6 ms with the recorded operation, 0.9-1.2 ms with combine compiled.
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


def _stats(tensors, options):
    logits, labels, weights, pos_weight, _ = tensors
    data_format, squared = options[:2]
    return ops.library().fused_segloss_stats(logits, labels, weights, pos_weight,
                                             data_format=data_format, squared=squared)


def _combine_fields(stats, class_weights, options):
    return tuple(_combine_tensors(stats, class_weights, *options[2:]))


def _combine_gradient(stats, class_weights, options, targets, output_gradients=None):
    """combine's result and the gradient of targets(result) w.r.t. stats and class_weights."""
    with tf.GradientTape() as tape:
        tape.watch([stats, class_weights])
        result = _combine_tensors(stats, class_weights, *options[2:])
    gradient = tape.gradient(targets(result), [stats, class_weights],
                             output_gradients=output_gradients,
                             unconnected_gradients=tf.UnconnectedGradients.ZERO)
    return result, gradient


def _combine_and_jacobian(stats, class_weights, options):
    """The 6 result fields, then d total / d stats and d total / d class_weights."""
    result, jacobian = _combine_gradient(stats, class_weights, options, lambda r: r.total)
    return (*result, *jacobian)


def _combine_vjp(stats, class_weights, *result_grads_and_options):
    *result_grads, options = result_grads_and_options
    return _combine_gradient(stats, class_weights, options, list, result_grads)[1]


# One set of traced functions per set of options and input signature. The op runs eagerly
# (one dispatch); `combine` (and its Jacobian) is one XLA-compiled call taking only the
# stats and the class weights: XLA fuses its ~40 tiny ops, and the call took 0.10-0.15 ms
# against 0.27-0.30 ms for the same function as a TF graph (64² forward+backward: 0.94
# against 1.24 ms, Zen 4). Binding a call's arguments costs tf.function about 0.1 ms per
# argument here, so the seven options are not arguments, and the cache keeps the
# ConcreteFunctions, whose call skips tf.function's argument binding and trace lookup.
# Each function traces once, with the exact static shapes: with shapes relaxed after a
# retrace, TF's graph optimiser rewrote the small reductions differently depending on
# which shapes a process had seen before. Bounded: a caller that varies shapes or an
# option every call (each new one traces anyway) cannot grow it without limit.
_MAX_FUNCTIONS = 64
_functions = {}


class _Traced:
    """The traced calls of one key, each traced on first use."""

    def __init__(self, options, tensors):
        self._options = options
        logits, _, _, _, class_weights = tensors
        classes = class_weights.shape[0]
        self._specs = [tf.TensorSpec([logits.shape[0], classes, 8], tf.float32),
                       tf.TensorSpec(class_weights.shape, tf.float32)]
        self._calls = {}

    def _get(self, name, body, specs, jit_compile):
        fn = self._calls.get(name)
        if fn is None:
            options = self._options
            traced = tf.function(lambda *args: body(*args, options), autograph=False,
                                 jit_compile=jit_compile)
            fn = self._calls[name] = traced.get_concrete_function(*specs)
        return fn

    # Traced where the caller stands: the Jacobian's inner tape must be traced while the
    # tape set records (tracing it under record.stop_recording() would give zeros).
    def combine_fields(self):
        return self._get("fields", _combine_fields, self._specs, _xla_compiles())

    def combine_with_jacobian(self):
        return self._get("jacobian", _combine_and_jacobian, self._specs, _xla_compiles())

    def vjp(self, result):
        specs = self._specs + [tf.TensorSpec(t.shape, t.dtype) for t in result]
        return self._get("vjp", _combine_vjp, specs, False)


_xla_state = []


def _xla_compiles():
    """Whether this TensorFlow JIT-compiles on the CPU (the pip wheels do); else `combine`
    runs as a TF graph. Probed once per process with a one-op function."""
    if not _xla_state:
        try:
            tf.function(lambda t: t + 1.0, jit_compile=True)(tf.constant(1.0))
            _xla_state.append(True)
        except (tf.errors.OpError, ValueError):
            _xla_state.append(False)
    return _xla_state[0]


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
    combine = traced.combine_with_jacobian()
    with record.stop_recording():
        stats = _stats(tensors, options)
        *result, d_stats, d_class_weights = combine(stats, class_weights)

    def backward(*result_grads):
        d_total = result_grads[0]
        if tf.executing_eagerly() and _all_zero(result_grads[1:]):
            if d_total is None or float(d_total._numpy()) == 1.0:  # noqa: SLF001
                grad_stats, grad_class_weights = d_stats, d_class_weights
            else:
                grad_stats, grad_class_weights = d_stats * d_total, d_class_weights * d_total
        else:
            zeros = [tf.zeros_like(r) if g is None else g for g, r in zip(result_grads, result)]
            grad_stats, grad_class_weights = traced.vjp(result)(stats, class_weights, *zeros)
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
    return SegLossResult(*traced.combine_fields()(_stats(tensors, options), cw))
