"""seg_loss_result called eagerly on the fused path: the op and `combine` as one traced call.

Eagerly, `segloss_stats` followed by `combine` is an op dispatch, a traced `combine` call,
and under a GradientTape the backward of each: a fixed cost of about 4 ms per step on the CI
machine (64² images: 5.8 ms eager against 1.7 ms in tf.function), a third of the step at
256². One traced function instead removes most of it (tiny inputs, forward+backward: about
3 ms against 4-5 ms op by op; the forward alone 0.7 ms against 2 ms).
The static checks (shapes, dtypes, option values) still run eagerly first, so bad input
raises the same ValueError before anything is traced. Options are static arguments, as in
`combine`: each distinct set of options and input shapes is traced once (see _function_for).
"""
import tensorflow as tf

from . import _inputs, ops
from .combine import _combine_tensors, check_options, class_weight_vector


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


def _result_tensors(logits, labels, weights, pos_weight, class_weights, options):
    data_format, squared, ce_weight, dice_weight, dice_mode, smooth, empty = options
    stats = ops.library().fused_segloss_stats(logits, labels, weights, pos_weight,
                                              data_format=data_format, squared=squared)
    return _combine_tensors(stats, class_weights, ce_weight, dice_weight, dice_mode, smooth,
                            empty)


# One traced function per set of options and input signature, taking only the five
# tensors. Binding a call's arguments costs tf.function about 0.1 ms per argument here, so
# the seven options as arguments made each call ~0.5 ms slower (measured); and the cache
# keeps the ConcreteFunction itself, whose call skips tf.function's argument binding and
# trace lookup (64² images: forward 1.8 -> 1.3 ms, forward+backward 4.1 -> 3.8 ms, one
# interleaved run). Each function traces once, with the exact static shapes, as
# `combine`'s own traced function does: with shapes relaxed after a retrace, TF's graph
# optimiser rewrote the small reductions differently and the loss moved by 1 ulp against
# `combine(segloss_stats(...))` depending on which shapes a process had seen before. Bounded: a caller that varies shapes or an
# option every call (each new one traces anyway) cannot grow it without limit.
_MAX_FUNCTIONS = 64
_functions = {}


def _function_for(options, tensors):
    key = (options, tuple((tuple(t.shape), t.dtype) for t in tensors))
    fn = _functions.get(key)
    if fn is None:
        if len(_functions) >= _MAX_FUNCTIONS:
            _functions.pop(next(iter(_functions)))
        traced = tf.function(lambda x, z, w, pw, cw: _result_tensors(x, z, w, pw, cw, options),
                             autograph=False)
        fn = _functions[key] = traced.get_concrete_function(*tensors)
    return fn


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
    return _function_for(options, tensors)(*tensors)
