"""The XLA path: the fused kernels as typed-FFI custom calls inside XLA.

Inside tf.function(jit_compile=True) or Keras' XLA-compiled train step a TF custom op has
no XLA kernel, so the statistics op and its gradient are emitted as StableHLO
`custom_call`s (api_version 4, the typed FFI) wrapped in an XlaCallModule op. The
handlers `fused_segloss_stats` / `fused_segloss_stats_grad` are registered by the op
library itself (csrc/tf/segloss_xla_ffi.cc) and call the same C++ core as the TF op.

This is the ONE module that imports private TensorFlow modules (control_flow_util,
tf2xla's call_module, the StableHLO serialiser). If they are missing, or a self-check
shows that this TF version changed their behaviour, available() is False, one warning
says why, and ops.py uses the pure-TF reference inside XLA instead: never an error.
"""
import functools
import threading
import warnings

import numpy as np
import tensorflow as tf

from . import _inputs, _loader

try:  # private TF modules: isolated here, checked by _self_check()
    from tensorflow.compiler.mlir.stablehlo import stablehlo as _stablehlo
    from tensorflow.compiler.tf2xla.python import xla as _tfxla
    from tensorflow.python.ops import control_flow_util as _control_flow_util
    _IMPORT_ERROR = None
except Exception as exc:  # noqa: BLE001 - any import problem means: no XLA path
    _stablehlo = _tfxla = _control_flow_util = None
    _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

STATS_TARGET = "fused_segloss_stats"
GRAD_TARGET = "fused_segloss_stats_grad"

# StableHLO element types of the dtypes the kernels take (bool is XLA's PRED: i1).
_ELEMENT_TYPES = {tf.float32: "f32", tf.float64: "f64", tf.float16: "f16",
                  tf.bfloat16: "bf16", tf.uint8: "ui8", tf.bool: "i1", tf.int32: "i32",
                  tf.int64: "i64"}


class FusedSeglossXlaWarning(UserWarning):
    """The XLA custom-call path is unavailable; the reference runs inside XLA instead."""


def in_xla_context():
    """True while tracing code that XLA will compile (jit_compile=True or an XLA scope)."""
    if _control_flow_util is None:
        return False
    return bool(_control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph()))


# ----------------------------------------------------------------------------------------
# Availability: decided once per process, with at most one warning.

_lock = threading.Lock()
_available = None
_reason = ""


@tf.autograph.experimental.do_not_convert  # plain Python, often reached while tracing
def available():
    """Whether the custom-call path can be used; False (with one warning) otherwise."""
    global _available, _reason
    if _available is None:
        with _lock:
            if _available is None:
                _reason = _unavailable_reason()
                _available = not _reason
                if _reason:
                    warnings.warn(
                        f"fused_segloss: the XLA custom-call path is unavailable ({_reason}); "
                        "inside XLA-compiled code the pure-TF reference is used instead.",
                        FusedSeglossXlaWarning, stacklevel=3)
    return _available


def unavailable_reason():
    """'' when available(), else why not."""
    available()
    return _reason


def _unavailable_reason():
    if _IMPORT_ERROR is not None:
        return f"TensorFlow's private XLA modules could not be imported ({_IMPORT_ERROR})"
    status = _loader.status()
    if not status.available:
        return f"the op library is unavailable: {status.reason}"
    if status.build_info.get("xla_ffi") == "OFF":
        return ("the op library was built without the XLA FFI handlers: this TensorFlow's "
                "headers have no xla/ffi/api/ffi.h (TensorFlow 2.20 and newer have it)")
    if tf.config.list_physical_devices("GPU") and "CUDA" not in platforms():
        return ("a GPU is visible but the op library was built without CUDA, so there is no "
                "GPU handler for the custom call")
    try:
        return _self_check()
    except Exception as exc:  # noqa: BLE001 - a changed private API must not break users
        return f"the self-check failed with {type(exc).__name__}: {exc}"


@tf.autograph.experimental.do_not_convert
def _self_check():
    """Compiles and runs a tiny custom call and compares it with the TF op ('' if equal).

    It runs eagerly (lifted out of any graph being traced) so that a TF version whose
    call_module or FFI behaves differently is caught here, not in the user's train step.
    In TF1-style graph mode there is nothing to run eagerly: the static checks suffice.
    """
    for name in ("call_module", "call_module_maximum_supported_version"):
        if not hasattr(_tfxla, name):
            return f"tf2xla's xla module has no `{name}`"
    for name in ("serialize_portable_artifact_str", "get_current_version"):
        if not hasattr(_stablehlo, name):
            return f"the StableHLO module has no `{name}`"
    if not hasattr(_control_flow_util, "GraphOrParentsInXlaContext"):
        return "control_flow_util has no `GraphOrParentsInXlaContext`"
    with tf.init_scope():
        if not tf.executing_eagerly():
            return ""
        rng = np.random.default_rng(0)
        logits = tf.constant(rng.normal(size=(2, 3, 2)), tf.float32)
        labels = tf.constant(rng.random((2, 3, 2)) < 0.5)  # bool: XLA's one-byte PRED
        prepared = _inputs.prepare(logits, labels)

        # tf.gradients, not a tape: init_scope pauses every tape on this thread.
        @tf.function(jit_compile=True, autograph=False)
        def probe(x):
            s = stats(prepared._replace(logits=x), _checked=True)
            return s, tf.gradients(tf.reduce_sum(s), x)[0]

        got_stats, got_grad = probe(logits)
        lib = _loader.status().module
        no_weights, no_pos_weight = _inputs.canonical_weights(prepared), \
            _inputs.pos_weight_or_empty(prepared)
        want_stats = lib.fused_segloss_stats(logits, labels, no_weights, no_pos_weight)
        want_grad = lib.fused_segloss_stats_grad(logits, labels, no_weights, no_pos_weight,
                                                 tf.ones_like(want_stats))
        if not (np.array_equal(got_stats, want_stats) and np.array_equal(got_grad, want_grad)):
            return "the custom call's result differs from the TF op's"
    return ""


def _reset_for_tests(value=None):
    """Test hook: force available() to `value` (None: decide again on next use)."""
    global _available, _reason
    _available, _reason = value, ("forced off by a test" if value is False else "")


# ----------------------------------------------------------------------------------------
# StableHLO modules

def platforms():
    """The XlaCallModule platforms: CPU always, CUDA when the library has CUDA handlers."""
    if _loader.status().build_info.get("cuda") == "ON":
        return ("CPU", "CUDA")
    return ("CPU",)


def _tensor_type(rank, element):
    return "tensor<" + "?x" * rank + element + ">"


@functools.lru_cache(maxsize=None)
def _module(target, logits_type, labels_type, rank, channels_last, squared, weights_rank,
            has_pos_weight, check_numerics, platform_names, focal_gamma=0.0, focal_alpha=-1.0,
            labels_rank=None, softmax=False, has_ignore_index=False, ignore_index=0):
    """Serialised StableHLO calling `target`; every dimension dynamic (shape-polymorphic).

    Sparse labels (softmax class ids) have rank `labels_rank` = rank - 1; the handlers
    tell them from dense labels by that rank, as the TF op does.

    The result's shape is computed from the operands' sizes at run time and handed to
    the custom call as a shape operand (indices_of_shape_operands), which is how XLA
    refines the dynamic result type when it compiles for concrete shapes. With more than
    one platform, XlaCallModule passes the platform index as the first argument; the
    handler is looked up per platform by name, so the module ignores it.
    """
    logits_t = _tensor_type(rank, logits_type)
    labels_rank = rank if labels_rank is None else labels_rank
    operands = [("logits", logits_t), ("labels", _tensor_type(labels_rank, labels_type)),
                ("weights", _tensor_type(weights_rank, "f32")),
                ("pos_weight", _tensor_type(1 if has_pos_weight else 0, "f32"))]
    class_axis = rank - 1 if channels_last else 1
    lines = []

    def dim(axis):
        name = f"%d{axis}"
        lines.append(f"{name}_s = stablehlo.get_dimension_size %logits, dim = {axis} : "
                     f"({logits_t}) -> tensor<i32>")
        lines.append(f"{name} = stablehlo.reshape {name}_s : (tensor<i32>) -> tensor<1xi32>")
        return name

    if target == STATS_TARGET:
        operands_in = operands
        parts = [dim(0), dim(class_axis), "%eight"]
        lines.append("%eight = stablehlo.constant dense<8> : tensor<1xi32>")
        result_t = "tensor<?x?x8xf32>"
    else:
        operands_in = operands + [("grad_stats", "tensor<?x?x8xf32>")]
        parts = [dim(axis) for axis in range(rank)]
        result_t = logits_t
    n = len(parts)
    lines.append(f"%shape = stablehlo.concatenate {', '.join(parts)}, dim = 0 : "
                 f"({', '.join(['tensor<1xi32>'] * n)}) -> tensor<{n}xi32>")
    call_args = ", ".join(f"%{name}" for name, _ in operands_in) + ", %shape"
    call_types = ", ".join(t for _, t in operands_in) + f", tensor<{n}xi32>"
    config = (f"channels_last = {str(channels_last).lower()}, "
              f"squared = {str(squared).lower()}, "
              f"focal_gamma = {_f32_literal(focal_gamma)}, "
              f"focal_alpha = {_f32_literal(focal_alpha)}, "
              f"softmax = {str(softmax).lower()}, "
              f"has_ignore_index = {str(has_ignore_index).lower()}, "
              f"ignore_index = {int(ignore_index)} : i64")
    side_effect = ""
    if target == STATS_TARGET:
        config += f", check_numerics = {str(check_numerics).lower()}"
        # Without it XLA may drop a call whose result is empty (B = 0 or C = 0) and with it
        # the handler's error for an invalid shape.
        side_effect = "has_side_effect = true, "
    lines.append(
        f"%result = stablehlo.custom_call @{target}({call_args}) {{api_version = 4 : i32, "
        f"{side_effect}backend_config = {{{config}}}, "
        f"indices_of_shape_operands = dense<[{len(operands_in)}]> : tensor<1xi64>}} : "
        f"({call_types}) -> {result_t}")
    lines.append(f"return %result : {result_t}")

    args = [f"%{name}: {t}" for name, t in operands_in]
    if len(platform_names) > 1:
        args.insert(0, "%platform_index: tensor<i32>")
    body = "\n    ".join(lines)
    text = (f"module @{target} attributes {{jax.uses_shape_polymorphism = true}} {{\n"
            f"  func.func public @main({', '.join(args)}) -> {result_t} {{\n"
            f"    {body}\n  }}\n}}\n")
    return _stablehlo.serialize_portable_artifact_str(text, _stablehlo.get_current_version())


def _f32_literal(value):
    """An MLIR f32 attribute holding exactly float32(value) (its bits in hex)."""
    return f"0x{int(np.float32(value).view(np.uint32)):08X} : f32"


def _call(target, prepared, operands, out_dtype, out_shape, check_numerics=False):
    weights = operands[2]
    focal = _inputs.focal_attrs(prepared)
    softmax = _inputs.activation_attrs(prepared)
    module = _module(target, _ELEMENT_TYPES[prepared.logits.dtype],
                     _ELEMENT_TYPES[prepared.labels.dtype], prepared.rank,
                     prepared.channels_last, prepared.squared, weights.shape.rank,
                     prepared.pos_weight is not None, check_numerics, platforms(),
                     focal["focal_gamma"], focal["focal_alpha"], prepared.labels.shape.rank,
                     softmax["activation"] == "softmax", softmax["has_ignore_index"],
                     softmax["ignore_index"])
    (result,) = _tfxla.call_module(
        list(operands), version=_tfxla.call_module_maximum_supported_version(),
        module=module, Tout=[out_dtype], Sout=[out_shape], platforms=list(platforms()))
    return result


# ----------------------------------------------------------------------------------------
# The op

def stats(prepared, check_numerics=False, _checked=False):
    """[B, C, 8] float32 statistics through the custom call, with its fused gradient.

    Only for code that XLA compiles (ops.py calls it there). `prepared` is an
    _inputs.Prepared. Labels, weights and pos_weight get no gradient.
    """
    if not _checked and not available():
        raise RuntimeError(f"the XLA custom-call path is unavailable: {_reason}")
    p = prepared
    operands = (p.logits, p.labels, _inputs.canonical_weights(p), _inputs.pos_weight_or_empty(p))
    stats_shape = tf.TensorShape([p.logits.shape[0], p.logits.shape[p.class_axis], 8])

    @tf.custom_gradient
    def fused(logits):
        result = _call(STATS_TARGET, p, (logits,) + operands[1:], tf.float32, stats_shape,
                       check_numerics)

        def grad(grad_stats):
            # The backward of an XLA-compiled forward is compiled by XLA too, even where it
            # is traced outside an XLA context (a tape outside the jit function): always
            # the custom call.
            return _call(GRAD_TARGET, p, (logits,) + operands[1:] + (
                tf.cast(grad_stats, tf.float32),), logits.dtype, logits.shape)

        return result, grad

    return fused(p.logits)
