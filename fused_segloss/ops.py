"""The public statistics op: input checks, path choice and gradients.

Paths (DESIGN §3): the fused TF op outside XLA, the XLA FFI custom call inside XLA
(see _xla.py), and the pure-TF reference when the library is unavailable or asked for.
"""
import os

import tensorflow as tf
from tensorflow.python.eager import record

from . import _inputs, _loader, _xla, reference

_OP_TYPE = "FusedSeglossStats"
_GRAD_OP_TYPE = "FusedSeglossStatsGrad"
_BYTES_OP_TYPE = "FusedSeglossStatsWithLabelBytes"
_BYTES_GRAD_OP_TYPE = "FusedSeglossStatsGradWithLabelBytes"

# Label bytes (LabelBytes in csrc/core/segloss_cpu.h): when a gradient will follow, the CPU
# forward also writes float labels as one byte each (where every label is 0 or 1), and the
# gradient pass reads those instead of the 2-8 byte labels. The gradient is the same bit for
# bit; the two passes move 17 instead of 20 bytes per element with float32 inputs, and the
# bytes hold 1/4 of float32 labels' memory from the forward to the backward. The kernel
# writes them only for inputs (logits + labels) of at least label_bytes_min_input_bytes
# (segloss_kernels_cpu.cc says why; tests lower it). Off on machines with a GPU (the ops
# are CPU-only) and with FUSED_SEGLOSS_LABEL_BYTES=0.
label_bytes_min_input_bytes = 32 << 20
label_bytes_enabled = os.environ.get("FUSED_SEGLOSS_LABEL_BYTES", "1") != "0"
_gpu_visible = []


def library():
    """The loaded op module, or None."""
    return _loader.status().module


def fused_available():
    return _loader.status().available


def _choose_path(implementation):
    _inputs.check_choice("implementation", implementation, _inputs.IMPLEMENTATIONS)
    if implementation == "reference":
        return "reference"
    if not fused_available():
        if implementation == "fused":
            raise RuntimeError(
                f"implementation='fused' was requested but the op library is unavailable: "
                f"{_loader.status().reason}. Build it with: {_loader.BUILD_COMMAND}")
        _loader.warn_fallback_once()
        return "reference"
    if _xla.in_xla_context():
        return "xla" if _xla.available() else "reference"
    return "fused"


def label_bytes_wanted(labels):
    """Whether the forward op that may write label bytes applies (see above); the caller
    checks that a gradient will be taken."""
    if not (label_bytes_enabled and labels.dtype.is_floating):
        return False
    if not _gpu_visible:
        _gpu_visible.append(bool(tf.config.list_physical_devices("GPU")))
    return not _gpu_visible[0]


def stats_with_label_bytes(logits, labels, weights, pos_weight, data_format, squared):
    """(stats, label_bytes) from the forward op that may write label bytes; the four
    inputs as the kernels take them (canonical weights, pos_weight or its sentinel)."""
    return library().fused_segloss_stats_with_label_bytes(
        logits, labels, weights, pos_weight, data_format=data_format, squared=squared,
        min_input_bytes=label_bytes_min_input_bytes)


def logit_grad(logits, labels, label_bytes, weights, pos_weight, grad_stats, data_format,
               squared):
    """The fused gradient op; the one that reads the forward's label bytes where there are
    any (label_bytes not None), else the plain one."""
    attrs = dict(data_format=data_format, squared=squared)
    if label_bytes is None:
        return library().fused_segloss_stats_grad(logits, labels, weights, pos_weight,
                                                  grad_stats, **attrs)
    return library().fused_segloss_stats_grad_with_label_bytes(
        logits, labels, label_bytes, weights, pos_weight, grad_stats, **attrs)


def segloss_stats(logits, labels, weights=None, pos_weight=None, *,
                  data_format="channels_last", squared=False, implementation="auto",
                  check_numerics=False):
    """Per-image, per-class sums [B, C, 8] (float32) in one pass over the data.

    Columns: ce_sum, weight_sum, intersection, pred_sum, label_sum, hard_tp, hard_pred,
    hard_label (DESIGN §2.1). `weights` broadcasts to the logits' shape (w = 0 ignores an
    element); `pos_weight` is [C]. Gradients flow to `logits` only.
    """
    p = _inputs.prepare(logits, labels, weights, pos_weight, data_format, squared)
    if not isinstance(check_numerics, bool):
        raise ValueError(f"`check_numerics` must be a bool, got {check_numerics!r}")
    path = _choose_path(implementation)
    if path == "xla":  # the kernel counts non-finite logits (CheckNumerics compiles away)
        return _xla.stats(p, check_numerics=check_numerics)
    if check_numerics:
        p = p._replace(logits=tf.debugging.check_numerics(
            p.logits, "fused_segloss: `logits` contain NaN or Inf (check_numerics=True)"))
    if path == "reference":
        return reference.stats_from_prepared(p)
    inputs = (p.logits, p.labels, _inputs.canonical_weights(p), _inputs.pos_weight_or_empty(p))
    if label_bytes_wanted(p.labels) and record.should_record_backprop([p.logits]):
        return stats_with_label_bytes(*inputs, p.data_format, p.squared)[0]
    return library().fused_segloss_stats(*inputs, data_format=p.data_format,
                                         squared=p.squared)


def _op_logit_grad(op, label_bytes, grad_stats):
    """One fused backward pass; labels, weights and pos_weight get no gradient."""
    logits, labels, weights, pos_weight = op.inputs[:4]
    grad_logits = logit_grad(logits, labels, label_bytes, weights, pos_weight, grad_stats,
                             op.get_attr("data_format"), op.get_attr("squared"))
    return [grad_logits, None, None, None]


@tf.RegisterGradient(_OP_TYPE)
def _stats_grad(op, grad_stats):
    return _op_logit_grad(op, None, grad_stats)


@tf.RegisterGradient(_BYTES_OP_TYPE)
def _stats_with_label_bytes_grad(op, grad_stats, _):
    """The same pass, reading the forward's label bytes (output 1) where it wrote them."""
    return _op_logit_grad(op, op.outputs[1], grad_stats)


def _no_second_order(op_type):
    def gradient(op, grad):
        raise NotImplementedError(
            f"Second-order gradients of fused_segloss are not implemented: the op {op_type} "
            "(gradient of FusedSeglossStats) has no gradient. Use implementation='reference' "
            "for higher-order derivatives.")
    return gradient


tf.RegisterGradient(_GRAD_OP_TYPE)(_no_second_order(_GRAD_OP_TYPE))
tf.RegisterGradient(_BYTES_GRAD_OP_TYPE)(_no_second_order(_BYTES_GRAD_OP_TYPE))
