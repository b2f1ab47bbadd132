"""How Keras' `sample_weight` becomes the op's element weights, and how Keras' `y_true`
becomes the op's labels, in one place.

Keras hands a loss `sample_weight` of shape (B,) (one weight per image) or of the label
shape without the class axis (B, *S) (one weight per pixel). fused_segloss has no
per-sample loss to multiply: every weight enters the statistics' sums as an element
weight w, so a weight of 0 removes pixels from every sum and a weight of 2 counts them
twice in the CE mean and in the Dice sums.

    (B,)  or (B, 1, ..., 1)          -> [B, 1, ..., 1]     the same weight for every pixel and class of an image
    (B, *S)                          -> [B, *S, 1] (channels_last) / [B, 1, *S] (channels_first)
    the logits' rank, broadcastable  -> passed unchanged  (e.g. [B, *S, C]: per pixel and class)
"""
import tensorflow as tf

from .. import _inputs


def sample_weight_to_weights(sample_weight, logits_rank, data_format="channels_last"):
    """The element-weight tensor for `segloss_stats`, or None when `sample_weight` is None."""
    if sample_weight is None:
        return None
    weight = tf.convert_to_tensor(sample_weight)
    if not (weight.dtype.is_floating or weight.dtype.is_integer or weight.dtype == tf.bool):
        raise ValueError(f"`sample_weight` must be a real number tensor, got {weight.dtype.name}")
    weight = tf.cast(weight, tf.float32)
    rank = weight.shape.rank
    if rank is None:
        raise ValueError("`sample_weight` must have a known rank")
    per_image = rank == 1 or (rank >= 2 and all(d == 1 for d in weight.shape[1:]))
    if per_image:
        batch = tf.shape(weight)[:1]
        return tf.reshape(weight, tf.concat([batch, tf.ones([logits_rank - 1], tf.int32)], 0))
    if rank == logits_rank - 1:  # a per-pixel map: add the class axis
        return tf.expand_dims(weight, -1 if data_format == "channels_last" else 1)
    if rank == logits_rank:
        return weight
    raise ValueError(
        f"`sample_weight` of shape {weight.shape} does not fit logits of rank {logits_rank}: "
        "use (B,) per image, (B, *spatial) per pixel, or a tensor of the logits' rank that "
        "broadcasts to them")


def keras_labels(y_true, logits, activation, data_format="channels_last"):
    """`y_true` for segloss_stats: unchanged, except float class ids in softmax mode.

    Keras may hand a loss or metric `y_true` as float32 (a float dataset, or a model
    compiled for float targets), while the op reads class ids only from integer labels.
    With activation="softmax", float `y_true` of a sparse shape ([B, *S], or with a class
    axis of size 1 when C > 1) holds class ids: it is cast to int32, truncating toward
    zero as Keras' SparseCategoricalCrossentropy does. Float labels of the logits' shape
    stay dense (one-hot or soft).
    """
    if activation != "softmax":
        return y_true
    labels = tf.convert_to_tensor(y_true)
    if not labels.dtype.is_floating:
        return labels
    rank = logits.shape.rank
    if labels.shape.rank is None or rank is None:
        return labels
    class_axis = rank - 1 if data_format == "channels_last" else 1
    sparse = _inputs.sparse_form(labels.shape, logits.shape, class_axis) is not None
    return tf.cast(labels, tf.int32) if sparse else labels
