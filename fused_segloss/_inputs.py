"""Input checks and canonical forms, in one place for every entry point.

Static problems (ranks, shapes known while tracing, dtypes, option strings) raise
ValueError naming the argument. Data-dependent problems (labels outside [0, 1], class
ids outside [0, C), negative weights) are found by the kernels (InvalidArgumentError)
or, on the reference path, by tf.debugging assertions with the same wording.

Labels, canonicalised here (free reshapes and casts of small dtypes only):
  sigmoid:  the logits' shape; float, uint8, bool, or int32/int64 0/1 masks (cast to
            float32, see `_dense_labels`).
  softmax:  dense: the logits' shape (float soft or one-hot, uint8/bool one-hot,
            int32/int64 one-hot cast to float32);
            sparse class ids (uint8, int32, int64): [B, *S] as they are, or with a class
            axis of size 1 ([B, *S, 1] channels_last, [B, 1, *S] channels_first), which
            is squeezed to [B, *S]. Never expanded to one-hot here: the kernels read ids.
"""
from typing import NamedTuple, Optional

import numpy as np
import tensorflow as tf

LOGIT_DTYPES = (tf.float16, tf.bfloat16, tf.float32, tf.float64)
ID_DTYPES = (tf.uint8, tf.int32, tf.int64)  # sparse class ids (softmax)
LABEL_DTYPES = LOGIT_DTYPES + (tf.uint8, tf.bool, tf.int32, tf.int64)
DATA_FORMATS = ("channels_last", "channels_first")
IMPLEMENTATIONS = ("auto", "fused", "reference")
ACTIVATIONS = ("sigmoid", "softmax")


def _names(dtypes):
    return ", ".join(d.name for d in dtypes)


def check_choice(name, value, choices):
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"`{name}` must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


class Prepared(NamedTuple):
    logits: tf.Tensor
    labels: tf.Tensor
    weights: Optional[tf.Tensor]      # float32, same rank as logits, broadcastable
    pos_weight: Optional[tf.Tensor]   # float32 [C]
    channels_last: bool
    squared: bool
    focal_gamma: float = 0.0               # >= 0; 0 (with no alpha) is plain cross-entropy
    focal_alpha: Optional[float] = None    # in [0, 1], or None
    activation: str = "sigmoid"            # "sigmoid" or "softmax"
    sparse: bool = False                   # labels are class ids [B, *S] (softmax only)
    ignore_index: Optional[int] = None     # sparse ids equal to it have weight 0

    @property
    def rank(self):
        return self.logits.shape.rank

    @property
    def class_axis(self):
        return self.rank - 1 if self.channels_last else 1

    @property
    def spatial_axes(self):
        return [a for a in range(1, self.rank) if a != self.class_axis]

    @property
    def label_axes(self):
        """The logits' axes that sparse labels have (all but the class axis)."""
        return [a for a in range(self.rank) if a != self.class_axis]

    @property
    def data_format(self):
        return "channels_last" if self.channels_last else "channels_first"


def _as_tensor(value, name):
    try:
        return tf.convert_to_tensor(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"`{name}` could not be converted to a tensor: {exc}") from None


def check_focal(focal_gamma=0.0, focal_alpha=None):
    """(gamma, alpha) as Python floats (alpha may be None); ValueError naming the argument."""
    def number(value, name):
        if isinstance(value, (bool, np.bool_, str, bytes)):
            raise ValueError(f"`{name}` must be a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"`{name}` must be a number known when the loss is built, "
                             f"got {value!r}") from None

    gamma = number(focal_gamma, "focal_gamma")
    if not (np.isfinite(gamma) and gamma >= 0.0):
        raise ValueError(f"`focal_gamma` must be finite and >= 0, got {focal_gamma!r}")
    if focal_alpha is None:
        return gamma, None
    alpha = number(focal_alpha, "focal_alpha")
    if not 0.0 <= alpha <= 1.0:  # False for NaN too
        raise ValueError(f"`focal_alpha` must be None or in [0, 1], got {focal_alpha!r}")
    return gamma, alpha


def check_activation(activation, pos_weight=None, focal_alpha=None, ignore_index=None):
    """ValueError naming the argument for an option that `activation` cannot take."""
    check_choice("activation", activation, ACTIVATIONS)
    if ignore_index is not None and (isinstance(ignore_index, (bool, np.bool_))
                                     or not isinstance(ignore_index, (int, np.integer))):
        raise ValueError(f"`ignore_index` must be None or an int (a class id), got {ignore_index!r}")
    if activation == "softmax":
        if pos_weight is not None:
            raise ValueError("`pos_weight` has no meaning with activation='softmax' (one class "
                             "per pixel, no negative term): weight classes with `class_weights`")
        if focal_alpha is not None:
            raise ValueError("`focal_alpha` has no meaning with activation='softmax': weight "
                             "classes with `class_weights` (focal_gamma works in both modes)")
    elif ignore_index is not None:
        raise ValueError("`ignore_index` needs activation='softmax' with sparse integer "
                         f"`labels` (class ids), got activation={activation!r}; with sigmoid "
                         "use a weights map of 0 at the ignored pixels")
    return None if ignore_index is None else int(ignore_index)


def focal_enabled(p: "Prepared"):
    """Whether the cross-entropy column carries the focal factor."""
    return p.focal_gamma != 0.0 or p.focal_alpha is not None


def focal_attrs(p: "Prepared"):
    """The kernels' focal attributes: focal_alpha < 0 means None (segloss_ops.cc)."""
    return {"focal_gamma": p.focal_gamma,
            "focal_alpha": -1.0 if p.focal_alpha is None else p.focal_alpha}


def activation_attrs(p: "Prepared"):
    """The kernels' softmax attributes (the TF op's; _xla.py spells them for the FFI)."""
    return {"activation": p.activation, "has_ignore_index": p.ignore_index is not None,
            "ignore_index": 0 if p.ignore_index is None else p.ignore_index}


def prepare(logits, labels, weights=None, pos_weight=None, data_format="channels_last",
            squared=False, focal_gamma=0.0, focal_alpha=None, activation="sigmoid",
            ignore_index=None):
    check_choice("data_format", data_format, DATA_FORMATS)
    if not isinstance(squared, bool):
        raise ValueError(f"`squared` must be a bool, got {squared!r}")
    focal_gamma, focal_alpha = check_focal(focal_gamma, focal_alpha)
    ignore_index = check_activation(activation, pos_weight, focal_alpha, ignore_index)
    logits = _as_tensor(logits, "logits")
    if logits.dtype not in LOGIT_DTYPES:
        raise ValueError(f"`logits` must have dtype {_names(LOGIT_DTYPES)}; got {logits.dtype.name}")
    labels = _as_tensor(labels, "labels")
    if labels.dtype not in LABEL_DTYPES:
        raise ValueError(f"`labels` must have dtype {_names(LABEL_DTYPES)}; got {labels.dtype.name}")
    rank = logits.shape.rank
    if rank is None or not 2 <= rank <= 5:
        raise ValueError(
            "`logits` must have a known rank from 2 to 5: [B, *spatial, C] (channels_last) or "
            f"[B, C, *spatial] (channels_first) with 0 to 3 spatial dims; got shape {logits.shape}")
    channels_last = data_format == "channels_last"
    class_axis = rank - 1 if channels_last else 1
    if activation == "softmax":
        labels, sparse = _softmax_labels(logits, labels, class_axis)
    else:
        if not labels.shape.is_compatible_with(logits.shape):
            raise ValueError(f"`labels` shape {labels.shape} must equal the `logits` shape "
                             f"{logits.shape}")
        labels, sparse = _dense_labels(labels), False
    if ignore_index is not None and not sparse:
        raise ValueError(f"`ignore_index` needs sparse integer `labels` (class ids, the logits' "
                         f"shape without the class axis), got {labels.dtype.name} labels of "
                         f"shape {labels.shape}")
    classes = logits.shape[class_axis]
    if classes == 0:
        raise ValueError(f"`logits` must have at least one class (C >= 1) on axis {class_axis}, "
                         f"got shape {logits.shape}")

    if weights is not None:
        weights = _as_tensor(weights, "weights")
        if not (weights.dtype.is_floating or weights.dtype.is_integer or weights.dtype == tf.bool):
            raise ValueError(f"`weights` must be a real number tensor, got {weights.dtype.name}")
        weights = tf.cast(weights, tf.float32)
        w_rank = weights.shape.rank
        if w_rank is None or w_rank > rank:
            raise ValueError(f"`weights` of shape {weights.shape} must have a known rank <= the "
                             f"logits' rank {rank} and broadcast to {logits.shape}")
        if w_rank < rank:
            weights = tf.reshape(weights, [1] * (rank - w_rank) + _dims(weights))
        for axis, (wd, ld) in enumerate(zip(weights.shape, logits.shape)):
            if wd is not None and ld is not None and wd not in (1, ld):
                raise ValueError(f"`weights` of shape {weights.shape} does not broadcast to the "
                                 f"logits' shape {logits.shape} (axis {axis}: {wd} vs {ld})")

    if pos_weight is not None:
        pos_weight = tf.cast(_as_tensor(pos_weight, "pos_weight"), tf.float32)
        if pos_weight.shape.rank != 1 or (
                classes is not None and pos_weight.shape[0] not in (None, classes)):
            raise ValueError(f"`pos_weight` must have shape [C] = [{classes}], got {pos_weight.shape}")
        static = tf.get_static_value(pos_weight)
        if static is not None and not np.all(np.isfinite(static) & (static >= 0)):
            raise ValueError(f"`pos_weight` must be finite and >= 0, got {static.tolist()}")
    return Prepared(logits, labels, weights, pos_weight, channels_last, squared, focal_gamma,
                    focal_alpha, activation, sparse, ignore_index)


def _dense_labels(labels):
    """Dense labels for the kernels. int32/int64 0/1 masks are cast to float32: the
    kernels read int32/int64 only as class ids, and the cast keeps every value exact (an
    int 2 becomes 2.0), so out-of-range masks are still caught by the [0, 1] check."""
    if labels.dtype in (tf.int32, tf.int64):
        return tf.cast(labels, tf.float32)
    return labels


def sparse_form(labels_shape, logits_shape, class_axis):
    """What labels of `labels_shape` are for softmax logits of `logits_shape`, by shape
    alone: "ids" ([B, *S], the logits' rank - 1), "ids_with_class_axis" (the logits' rank
    with a class axis of size 1, where C is not 1), or None (the dense shape, or no form).
    Both ranks must be known."""
    rank = logits_shape.rank
    if labels_shape.rank == rank - 1:
        return "ids"
    if (labels_shape.rank == rank and labels_shape[class_axis] == 1
            and logits_shape[class_axis] != 1):
        return "ids_with_class_axis"
    return None


def _softmax_labels(logits, labels, class_axis):
    """(labels, sparse) for activation='softmax' (the rules are in the module docstring)."""
    rank = logits.shape.rank
    without_class = tf.TensorShape([d for a, d in enumerate(logits.shape) if a != class_axis])
    forms = (f"dense labels of the logits' shape {logits.shape}, or class ids (uint8, int32, "
             f"int64) of shape {without_class} or with a class axis of size 1")
    form = sparse_form(labels.shape, logits.shape, class_axis)
    is_ids = labels.dtype in ID_DTYPES
    if form == "ids_with_class_axis" and is_ids:
        labels = tf.squeeze(labels, axis=class_axis)  # [B, *S, 1] / [B, 1, *S] -> [B, *S]
        form = "ids"
    if form == "ids":
        if not is_ids:
            raise ValueError(f"sparse `labels` (class ids, shape {labels.shape}) must be uint8, "
                             f"int32 or int64, got {labels.dtype.name}")
        if not labels.shape.is_compatible_with(without_class):
            raise ValueError(f"`labels` of shape {labels.shape} match no accepted form: "
                             f"{forms}")
        return labels, True
    if labels.shape.rank == rank and labels.shape.is_compatible_with(logits.shape):
        return _dense_labels(labels), False
    if form == "ids_with_class_axis":
        raise ValueError(f"`labels` of shape {labels.shape} look like class ids with a class "
                         f"axis of size 1, but class ids must be uint8, int32 or int64, got "
                         f"{labels.dtype.name} (cast them, or give one-hot labels)")
    raise ValueError(f"`labels` of shape {labels.shape} match no accepted form: {forms}")


def float_tuple(values, name):
    """A JSON-friendly tuple of floats (for get_config), or None."""
    if values is None:
        return None
    if isinstance(values, (tf.Tensor, tf.Variable)):
        values = tf.get_static_value(values) if isinstance(values, tf.Tensor) else values.numpy()
        if values is None:
            raise ValueError(f"`{name}` must be known when the loss is built (a list of numbers)")
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or array.size == 0 or not np.all(np.isfinite(array)) or (array < 0).any():
        raise ValueError(f"`{name}` must be a non-empty list of finite numbers >= 0, got {values!r}")
    return tuple(float(v) for v in array)


def _dims(t):
    """Static dims where known, else dynamic scalars (for tf.reshape)."""
    dynamic = tf.shape(t)
    return [d if d is not None else dynamic[i] for i, d in enumerate(t.shape)]


def canonical_weights(p: Prepared):
    """The rank-3 view [Bw, Nw, Cw] (or [Bw, Cw, Nw]) the kernels take; empty if absent.

    Batch and class axes keep their size (1 or full). The spatial axes collapse to one:
    size 1 when they are all 1 (no copy), the full N when none is 1 (a free reshape),
    and only for a partial spatial broadcast (e.g. a per-row map [B, H, 1, 1], also
    with some dims unknown while tracing) are the spatial axes expanded with
    tf.broadcast_to (which passes already full-size weights through).
    """
    if p.weights is None:
        return tf.zeros([0], tf.float32)
    w = p.weights
    spatial = p.spatial_axes
    w_spatial = [w.shape[a] for a in spatial]
    if all(d == 1 for d in w_spatial):
        n = 1
    elif all(d != 1 for d in w_spatial) or not spatial:
        # Full size (or unknown while tracing: then it must be all-1 or full at run time,
        # which the kernels check, naming `weights`; a partial broadcast needs static 1s).
        n = -1
    else:
        target = _dims(w)
        logit_dims = _dims(p.logits)
        for a in spatial:
            target[a] = logit_dims[a]
        w = tf.broadcast_to(w, target)
        n = -1
    dims = _dims(w)
    batch, klass = dims[0], dims[p.class_axis]
    shape = [batch, n, klass] if p.channels_last else [batch, klass, n]
    if n == -1 and not spatial:
        shape = [batch, 1, klass] if p.channels_last else [batch, klass, 1]
    return tf.reshape(w, shape)


def pos_weight_or_empty(p: Prepared):
    """pos_weight [C] for the kernels, or the rank-0 'absent' sentinel."""
    return p.pos_weight if p.pos_weight is not None else tf.zeros([], tf.float32)
