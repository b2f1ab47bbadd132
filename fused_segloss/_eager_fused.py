"""seg_loss_result called eagerly on the fused path: one op dispatch and one compiled call.

Eagerly, `segloss_stats` followed by `combine` is an op dispatch, a traced `combine` call,
and under a GradientTape TF's gradient of each: a fixed cost of 2-4 ms per step on the CI
machines, a third of the step at 256². Here instead:
- the fused op runs eagerly, and `combine` is one XLA-compiled call on the stats (a TF
  graph where this TensorFlow has no CPU JIT);
- under a tape, that call also returns d total / d stats (and d total / d class_weights),
  and the result is recorded on the tape as three operations (see _recorded_result): the
  stats, whose backward is the fused gradient op; `total`, whose backward is that Jacobian
  times the upstream gradient; and the other result fields, whose backward is a traced
  vector-Jacobian product of `combine`, for callers that differentiate them too.
Measured on Zen 4, 64² images, forward+backward: 2.4 ms with TF's gradient of one traced
call (op and combine), 1.6 ms with the recorded operation, 0.9-1.2 ms with combine compiled;
then, with the direct call (_direct_call) and the three operations, interleaved A/B in one
process: 64² 1.39-1.45 -> 1.02-1.07 ms, 256² 4.89 -> 4.38-4.45, 512² 15.4-16.3 -> 14.7-15.9
(forward only: 64² 0.62-0.64 -> 0.47-0.49 ms, 512² 8.24-8.30 -> 7.84-8.01).
The static checks (shapes, dtypes, option values) still run eagerly first, so bad input
raises the same ValueError before anything is traced. Options are static arguments, as in
`combine`: each distinct set of options and input shapes is traced once (see _function_for).
`tensorflow.python.eager.record` (the tape's recording API, as tf.custom_gradient uses it)
is private to TF: this module is its only user, and tests/test_eager_fused.py checks it.
"""

import tensorflow as tf
from tensorflow.python.eager import context, record

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

    def _get(self, name, body, specs, jit_compile, direct=False):
        fn = self._calls.get(name)
        if fn is None:
            options = self._options
            traced = tf.function(lambda *args: body(*args, options), autograph=False,
                                 jit_compile=jit_compile)
            fn = traced.get_concrete_function(*specs)
            fn = self._calls[name] = _direct_call(fn) if direct else fn
        return fn

    # Traced where the caller stands: the Jacobian's inner tape must be traced while the
    # tape set records (tracing it under record.stop_recording() would give zeros).
    # Both are called where nothing records (no tape watches the stats), so directly.
    def combine_fields(self):
        return self._get("fields", _combine_fields, self._specs, _xla_compiles(), direct=True)

    def combine_with_jacobian(self):
        return self._get("jacobian", _combine_and_jacobian, self._specs, _xla_compiles(),
                         direct=True)

    def vjp(self, result):
        specs = self._specs + [tf.TensorSpec(t.shape, t.dtype) for t in result]
        return self._get("vjp", _combine_vjp, specs, False)


def _direct_call(concrete):
    """fn(*tensors) -> flat tuple of outputs: the eager call of a ConcreteFunction whose
    inputs and outputs are flat tensors, without its Python argument handling and tape
    checks; only for calls that nothing records. Why: right after a pass over tens of MB,
    that Python layer runs with cold caches, and the call measured 0.50-0.88 ms through the
    ConcreteFunction against 0.17-0.33 ms direct (0.11 against 0.03 ms back to back; Zen 4).
    Falls back to the ConcreteFunction where this TensorFlow lacks the private pieces."""
    try:
        inference = concrete.inference_fn
        name, outputs = inference.name, len(inference.function_type.flat_outputs)
        captured = list(concrete.captured_inputs)
        call_function = context.context().call_function
    except AttributeError:
        return concrete

    def call(*tensors):
        return tuple(call_function(name, [*tensors, *captured], outputs))

    # The runtime function lives as long as its Python function object: keep it.
    call.concrete_function = concrete
    return call


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


def _recorded_result(traced, tensors, options):
    """The result, recorded on the active tape(s) as three operations:
      stats  = op(logits, labels, weights, pos_weight)  backward: the fused gradient op
      total  = f(stats, class_weights)                  backward: Jacobian x d total
      fields = g(stats, class_weights)                  backward: combine's traced VJP
    The tape adds up what total and fields send back to stats before it calls the stats
    backward, so the gradient op runs once whichever results the caller differentiates.
    Why three and not one operation of all six results: the tape passes zeros for every
    output that got no gradient, and making those (backprop._zeros) and reading them to
    see whether the Jacobian suffices took about 0.2 ms of a step (64², Zen 4), a fifth of
    it; `total` alone, the common case, now has no other output."""
    logits, labels, weights, pos_weight, class_weights = tensors
    combine = traced.combine_with_jacobian()
    label_bytes = None  # the labels as bytes for the gradient pass (see ops.py)
    with record.stop_recording():
        if ops.label_bytes_wanted(labels):
            stats, label_bytes = ops.stats_with_label_bytes(logits, labels, weights,
                                                            pos_weight, *options[:2])
        else:
            stats = _stats(tensors, options)
        total, *fields, d_stats, d_class_weights = combine(stats, class_weights)

    def stats_backward(grad_stats):
        grad_logits = ops.logit_grad(logits, labels, label_bytes, weights, pos_weight,
                                     grad_stats, *options[:2])
        return [grad_logits, None, None, None]

    def total_backward(d_total):
        if tf.executing_eagerly() and float(d_total._numpy()) == 1.0:  # noqa: SLF001
            return [d_stats, d_class_weights]
        return [d_stats * d_total, d_class_weights * d_total]

    def fields_backward(*field_grads):
        grads = [tf.zeros_like(total)] + [tf.zeros_like(f) if g is None else g
                                          for g, f in zip(field_grads, fields)]
        return traced.vjp([total, *fields])(stats, class_weights, *grads)

    record.record_operation("FusedSeglossStats", [stats], [logits, labels, weights, pos_weight],
                            stats_backward)
    record.record_operation("FusedSeglossTotal", [total], [stats, class_weights], total_backward)
    record.record_operation("FusedSeglossFields", fields, [stats, class_weights],
                            fields_backward)
    return [total, *fields]


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
