"""fsl.keras.SegLoss: the fused loss as a Keras 3 loss (y_pred are logits)."""
import collections
import threading
import weakref

import keras
import tensorflow as tf

from .. import _inputs
from ..combine import (check_activation_options, check_options, check_overlap_with_squared,
                       class_weight_vector, combine)
from ..ops import segloss_stats
from . import _distribute
from ._weights import keras_labels, sample_weight_to_weights

_PACKAGE = "fused_segloss"
REDUCTIONS = ("sum_over_batch_size", "mean", "mean_with_sample_weight", "sum", "none", None)


class _RecentStats:
    """The statistics of the last few loss calls, so a metric fed the same tensors reuses them.

    Keras' train_step calls the loss and then the metrics with the very same y_true, y_pred
    and sample_weight objects; a metric that finds its inputs here skips a second pass over
    the data. Entries are matched by object identity through weak references (a recycled
    id() never matches), and a few are kept because MirroredStrategy traces one replica per
    thread.
    """

    _KEEP = 16

    def __init__(self):
        self._entries = collections.OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def _ref(value):
        if value is None:
            return lambda: None
        try:
            return weakref.ref(value)
        except TypeError:  # not weak-referenceable: never matches
            return lambda: object()

    def put(self, y_true, y_pred, sample_weight, stats):
        entry = (self._ref(y_true), self._ref(y_pred), self._ref(sample_weight), stats)
        with self._lock:
            self._entries[id(y_pred)] = entry
            self._entries.move_to_end(id(y_pred))
            while len(self._entries) > self._KEEP:
                self._entries.popitem(last=False)

    def get(self, y_true, y_pred, sample_weight):
        with self._lock:
            entry = self._entries.get(id(y_pred))
        if entry is None:
            return None
        true_ref, pred_ref, weight_ref, stats = entry
        if pred_ref() is y_pred and true_ref() is y_true and weight_ref() is sample_weight:
            return stats
        return None


@keras.saving.register_keras_serializable(package=_PACKAGE)
class SegLoss(keras.losses.Loss):
    """Cross-entropy + soft Dice for segmentation; `y_pred` are logits.

    activation="sigmoid" (default): multi-label, y_true of the logits' shape.
    activation="softmax": one class per pixel, y_true one-hot/soft of the logits' shape or
    class ids [B, *S] or [B, *S, 1] (int, or float holding whole numbers: Keras may hand
    labels over as float32, so float ids of the sparse shape are cast to int32).

    Formula: `fused_segloss.seg_loss(y_pred, y_true, weights, ...)`, i.e.
    total = ce_weight · CE + dice_weight · (1 − Dice) with the reduction order of
    `fused_segloss.combine`: first over pixels (and the batch) per class, then over classes.

    Args:
      ce_weight, dice_weight, dice_mode, smooth, empty, class_weights, overlap,
        tversky_alpha, tversky_beta: as in `combine`.
      pos_weight, data_format, squared, implementation, focal_gamma, focal_alpha,
        activation, ignore_index: as in `segloss_stats` (the focal options modulate the CE
        term only; pos_weight and focal_alpha are sigmoid-only).
      include_background: as in `combine` (False leaves class 0 out of the Dice; softmax only).
      reduction: "sum_over_batch_size" (default), "mean", "mean_with_sample_weight", "sum":
        all give the loss of the whole batch (it is already a mean: CE over weighted
        elements, Dice over classes; there is no per-sample vector to sum or divide).
        Under tf.distribute it is the loss of the *global* batch (see `_distribute`).
        "none" / None: a [B] vector, each image's loss from its own statistics alone.
      name: the loss's name. dtype: None (default) hands the logits to the op in their
        own dtype (float16/bfloat16 under mixed precision: no full-size cast) and returns
        float32; a given dtype casts the logits to it first and the loss to it at the end.

    `sample_weight` becomes the op's element weights (`_weights.sample_weight_to_weights`):
    (B,) -> [B, 1, ..., 1]; (B, *S) -> [B, *S, 1]; a tensor of the logits' rank unchanged.

    Raises:
      ValueError: at construction, for any option outside its allowed values.

    >>> import numpy as np, fused_segloss as fsl
    >>> loss = fsl.keras.SegLoss(dice_weight=0.0)       # plain sigmoid cross-entropy
    >>> round(float(loss(np.ones([2, 4, 4, 3]), np.zeros([2, 4, 4, 3]))), 4)   # log(2)
    0.6931
    >>> loss = fsl.keras.SegLoss(activation="softmax", ignore_index=255, dice_weight=0.0)
    >>> ids = np.full([2, 4, 4], 255, np.uint8); ids[:, 0] = 1   # one row labelled
    >>> round(float(loss(ids, np.zeros([2, 4, 4, 3], np.float32))), 4)   # log(3)
    1.0986
    """

    def __init__(self, ce_weight=1.0, dice_weight=1.0, dice_mode="batch", smooth=1e-5,
                 empty="include", class_weights=None, pos_weight=None,
                 data_format="channels_last", squared=False, implementation="auto",
                 reduction="sum_over_batch_size", name="seg_loss", dtype=None,
                 overlap="dice", tversky_alpha=0.5, tversky_beta=0.5, focal_gamma=0.0,
                 focal_alpha=None, activation="sigmoid", ignore_index=None,
                 include_background=True):
        if reduction not in REDUCTIONS:
            raise ValueError(f"`reduction` must be one of {REDUCTIONS}, got {reduction!r}")
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        check_options(ce_weight, dice_weight, dice_mode, smooth, empty, overlap, tversky_alpha,
                      tversky_beta)
        _inputs.check_choice("data_format", data_format, _inputs.DATA_FORMATS)
        _inputs.check_choice("implementation", implementation, _inputs.IMPLEMENTATIONS)
        if not isinstance(squared, bool):
            raise ValueError(f"`squared` must be a bool, got {squared!r}")
        check_overlap_with_squared(overlap, squared)
        self.focal_gamma, self.focal_alpha = _inputs.check_focal(focal_gamma, focal_alpha)
        check_activation_options(activation, include_background)
        self.ignore_index = _inputs.check_activation(activation, pos_weight, self.focal_alpha,
                                                     ignore_index)
        self.activation = activation
        self.include_background = include_background
        self.ce_weight = float(ce_weight)
        self.dice_weight = float(dice_weight)
        self.dice_mode = dice_mode
        self.smooth = float(smooth)
        self.empty = empty
        self.overlap = overlap
        self.tversky_alpha = float(tversky_alpha)
        self.tversky_beta = float(tversky_beta)
        self.class_weights = _inputs.float_tuple(class_weights, "class_weights")
        if self.class_weights is not None:
            class_weight_vector(self.class_weights, None)  # positive sum
        self.pos_weight = _inputs.float_tuple(pos_weight, "pos_weight")
        self.data_format = data_format
        self.squared = squared
        self.implementation = implementation
        self._explicit_dtype = None if dtype is None else self.dtype  # a dtype name
        self._recent = _RecentStats()

    # -- the pieces ------------------------------------------------------------------
    @property
    def stats_options(self):
        return dict(data_format=self.data_format, squared=self.squared,
                    implementation=self.implementation, focal_gamma=self.focal_gamma,
                    focal_alpha=self.focal_alpha, activation=self.activation,
                    ignore_index=self.ignore_index)

    @property
    def combine_options(self):
        return dict(ce_weight=self.ce_weight, dice_weight=self.dice_weight,
                    dice_mode=self.dice_mode, smooth=self.smooth, empty=self.empty,
                    class_weights=self.class_weights, overlap=self.overlap,
                    tversky_alpha=self.tversky_alpha, tversky_beta=self.tversky_beta,
                    activation=self.activation, include_background=self.include_background)

    def batch_stats(self, y_true, y_pred, sample_weight=None):
        """This replica's [B, C, 8] statistics (float32) with sample_weight mapped to weights."""
        logits = tf.convert_to_tensor(y_pred)
        if self._explicit_dtype is not None:
            logits = tf.cast(logits, self.dtype)
        weights = sample_weight_to_weights(sample_weight, logits.shape.rank, self.data_format)
        labels = keras_labels(y_true, logits, self.activation, self.data_format)
        return segloss_stats(logits, labels, weights, self.pos_weight, **self.stats_options)

    def recent_stats(self, y_true, y_pred, sample_weight=None):
        """The stats of an earlier call on these very tensors, or None (used by SegMetrics)."""
        return self._recent.get(y_true, y_pred, sample_weight)

    def per_image_losses(self, stats):
        """[B]: each image's loss from its own statistics."""
        options = self.combine_options
        return tf.map_fn(lambda row: combine(row[tf.newaxis], **options).total, stats,
                         fn_output_signature=tf.float32)

    # -- Keras -----------------------------------------------------------------------
    def __call__(self, y_true, y_pred, sample_weight=None):
        # Keras' Loss.__call__ would cast y_pred to float32 (a full-size copy under mixed
        # precision) and then average a per-sample vector; the Dice has no per-sample form.
        with tf.name_scope(self.name):
            stats = self.batch_stats(y_true, y_pred, sample_weight)
            self._recent.put(y_true, y_pred, sample_weight, stats)
            if self.reduction in (None, "none"):
                loss = self.per_image_losses(stats)
            else:
                context = _distribute.replica_context_with_peers()
                if context is None:
                    loss = combine(stats, **self.combine_options).total
                else:
                    shared = _distribute.global_stats(stats, self.dice_mode, context)
                    total = combine(shared, **self.combine_options).total
                    loss = _distribute.split_for_replicas(total, context)
            if self._explicit_dtype is not None:
                loss = tf.cast(loss, self.dtype)
            return loss

    def call(self, y_true, y_pred):
        """Per-image losses (Keras' per-sample hook); `__call__` does the batch loss."""
        return self.per_image_losses(self.batch_stats(y_true, y_pred))

    def get_config(self):
        config = super().get_config()
        config.update(ce_weight=self.ce_weight, dice_weight=self.dice_weight,
                      dice_mode=self.dice_mode, smooth=self.smooth, empty=self.empty,
                      class_weights=None if self.class_weights is None else list(self.class_weights),
                      pos_weight=None if self.pos_weight is None else list(self.pos_weight),
                      data_format=self.data_format, squared=self.squared,
                      implementation=self.implementation, dtype=self._explicit_dtype,
                      overlap=self.overlap, tversky_alpha=self.tversky_alpha,
                      tversky_beta=self.tversky_beta, focal_gamma=self.focal_gamma,
                      focal_alpha=self.focal_alpha, activation=self.activation,
                      ignore_index=self.ignore_index,
                      include_background=self.include_background)
        return config
