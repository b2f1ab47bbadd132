"""Per-class Keras metrics from the [B, C, 8] statistics, accumulated over an epoch.

One state variable [C, 8] holds the statistics summed over every batch of the epoch (and,
under tf.distribute, over replicas: Keras metric variables are summed on read). result()
combines them exactly as the loss does, so `dice/<class>` is the soft Dice of the whole
epoch's pixels (dice_mode "batch" over the epoch), `iou/<class>` the hard IoU
tp / (pred + label - tp), and `ce/<class>` the mean CE over the class's weighted elements
(including `pos_weight` and the focal options when the loss has them: it is the loss's CE
term; with softmax, over the pixels labelled with the class). When the overlap is not the
Dice ("jaccard" or "tversky"), `<overlap>/<class>` reports that index per class too.

No second pass where possible: given `loss=` (a SegLoss), the metric first asks the loss
for the statistics of its call on the very same (y_true, y_pred, sample_weight) objects,
which is what Keras' train_step and test_step pass; only when they are not there (a loss
without this metric, a call outside fit, or `metrics=` receiving no sample_weight while the
loss had one) does it run segloss_stats itself, forward only, with the loss's options.
Pass the metric in `weighted_metrics=` to have Keras give it the same sample_weight as the loss.
"""
import keras
import tensorflow as tf

from .. import _inputs
from ..combine import OVERLAPS, combine
from ..ops import segloss_stats
from ._weights import keras_labels, sample_weight_to_weights
from .loss import SegLoss

_PACKAGE = "fused_segloss"
QUANTITIES = ("dice", "iou", "ce")
# Overlaps with a per-class index of their own (generalized Dice has one value only).
PER_CLASS_OVERLAPS = ("jaccard", "tversky")


@keras.saving.register_keras_serializable(package=_PACKAGE)
class SegMetrics(keras.metrics.Metric):
    """Reports `{prefix}dice/<class>`, `{prefix}iou/<class>`, `{prefix}ce/<class>` in the logs.

    class_names: names used in the log keys (or num_classes for "0", "1", ...).
    loss: a SegLoss whose statistics are reused and whose options (data_format, pos_weight,
        squared, implementation, activation, ignore_index, overlap, tversky_alpha,
        tversky_beta) the metric uses where not given; without it, pass those options.
        Its focal options (focal_gamma, focal_alpha) always come from it, so that `ce/<class>`
        is the loss's CE term (plain cross-entropy without a loss).
    quantities: which of "dice", "iou", "ce" to report; `{prefix}<overlap>/<class>` is
        added when overlap is "jaccard" or "tversky".
    activation: "sigmoid" or "softmax" (then y_true may be class ids, as for SegLoss).

    >>> import numpy as np, fused_segloss as fsl
    >>> m = fsl.keras.SegMetrics(["bg", "cat"], activation="softmax", overlap="jaccard")
    >>> m.update_state(np.array([[0, 1]]), np.array([[[5.0, -5.0], [-5.0, 5.0]]]))
    >>> sorted(m.result())
    ['ce/bg', 'ce/cat', 'dice/bg', 'dice/cat', 'iou/bg', 'iou/cat', 'jaccard/bg', 'jaccard/cat']
    """

    def __init__(self, class_names=None, num_classes=None, loss=None,
                 quantities=QUANTITIES, prefix="", smooth=None, data_format=None,
                 pos_weight=None, squared=None, implementation=None, name="seg_metrics",
                 dtype=None, activation=None, ignore_index=None, overlap=None,
                 tversky_alpha=None, tversky_beta=None):
        super().__init__(name=name, dtype=dtype)
        if class_names is None:
            if num_classes is None:
                raise ValueError("give `class_names` (a list of names) or `num_classes`")
            class_names = [str(c) for c in range(int(num_classes))]
        class_names = [str(c) for c in class_names]
        if num_classes is not None and int(num_classes) != len(class_names):
            raise ValueError(f"`num_classes`={num_classes} but {len(class_names)} class names")
        if not class_names or len(set(class_names)) != len(class_names):
            raise ValueError(f"`class_names` must be non-empty and unique, got {class_names}")
        quantities = tuple(quantities)
        if not quantities or any(q not in QUANTITIES for q in quantities):
            raise ValueError(f"`quantities` must be a non-empty subset of {QUANTITIES}, got {quantities}")
        if isinstance(loss, dict):  # from_config
            loss = keras.saving.deserialize_keras_object(loss)
        if loss is not None and not isinstance(loss, SegLoss):
            raise ValueError(f"`loss` must be a fused_segloss.keras.SegLoss, got {type(loss).__name__}")
        self.class_names = class_names
        self.quantities = quantities
        self.prefix = str(prefix)
        self.loss = loss

        def option(value, from_loss, default):
            if value is not None:
                return value
            return getattr(loss, from_loss) if loss is not None else default

        self.smooth = float(option(smooth, "smooth", 1e-5))
        self.data_format = _inputs.check_choice(
            "data_format", option(data_format, "data_format", "channels_last"), _inputs.DATA_FORMATS)
        self.pos_weight = _inputs.float_tuple(option(pos_weight, "pos_weight", None), "pos_weight")
        self.squared = bool(option(squared, "squared", False))
        self.focal_gamma = loss.focal_gamma if loss is not None else 0.0
        self.focal_alpha = loss.focal_alpha if loss is not None else None
        self.implementation = _inputs.check_choice(
            "implementation", option(implementation, "implementation", "auto"),
            _inputs.IMPLEMENTATIONS)
        self.activation = _inputs.check_choice(
            "activation", option(activation, "activation", "sigmoid"), _inputs.ACTIVATIONS)
        self.ignore_index = _inputs.check_activation(
            self.activation, self.pos_weight, self.focal_alpha,
            option(ignore_index, "ignore_index", None))
        self.overlap = _inputs.check_choice("overlap", option(overlap, "overlap", "dice"),
                                            OVERLAPS)
        self.tversky_alpha = float(option(tversky_alpha, "tversky_alpha", 0.5))
        self.tversky_beta = float(option(tversky_beta, "tversky_beta", 0.5))
        self.totals = self.add_variable(shape=(len(class_names), 8), initializer="zeros",
                                        dtype="float32", aggregation="sum", name="totals")
        # Set while tracing (or per eager call): whether the last update reused the loss's stats.
        self.last_update_reused_loss_stats = False

    def _own_stats(self, y_true, y_pred, sample_weight):
        logits = tf.convert_to_tensor(y_pred)
        weights = sample_weight_to_weights(sample_weight, logits.shape.rank, self.data_format)
        labels = keras_labels(y_true, logits, self.activation, self.data_format)
        return segloss_stats(tf.stop_gradient(logits), labels, weights, self.pos_weight,
                             data_format=self.data_format, squared=self.squared,
                             implementation=self.implementation, focal_gamma=self.focal_gamma,
                             focal_alpha=self.focal_alpha, activation=self.activation,
                             ignore_index=self.ignore_index)

    def update_state(self, y_true, y_pred, sample_weight=None):
        stats = None
        if self.loss is not None:
            stats = self.loss.recent_stats(y_true, y_pred, sample_weight)
        self.last_update_reused_loss_stats = stats is not None
        if stats is None:
            stats = self._own_stats(y_true, y_pred, sample_weight)
        stats = tf.stop_gradient(stats)
        if stats.shape[1] is not None and stats.shape[1] != len(self.class_names):
            raise ValueError(f"{self.name}: the model has {stats.shape[1]} classes but "
                             f"{len(self.class_names)} class names were given")
        self.totals.assign_add(tf.reduce_sum(stats, axis=0))

    def _combined(self):
        return combine(tf.convert_to_tensor(self.totals)[tf.newaxis], smooth=self.smooth,
                       overlap=self.overlap, tversky_alpha=self.tversky_alpha,
                       tversky_beta=self.tversky_beta)

    def per_class(self):
        """(ce, dice, iou), each [C], of everything accumulated so far."""
        res = self._combined()
        return res.ce_per_class, res.dice_per_class, res.iou_per_class

    def result(self):
        res = self._combined()
        values = {"dice": res.dice_per_class, "iou": res.iou_per_class, "ce": res.ce_per_class}
        quantities = list(self.quantities)
        if self.overlap in PER_CLASS_OVERLAPS:
            values[self.overlap] = res.overlap_per_class
            quantities.append(self.overlap)
        return {f"{self.prefix}{q}/{name}": values[q][c]
                for q in quantities for c, name in enumerate(self.class_names)}

    def reset_state(self):
        self.totals.assign(tf.zeros_like(self.totals))

    def get_config(self):
        return {"name": self.name, "dtype": self.dtype, "class_names": list(self.class_names),
                "quantities": list(self.quantities), "prefix": self.prefix,
                "smooth": self.smooth, "data_format": self.data_format,
                "pos_weight": None if self.pos_weight is None else list(self.pos_weight),
                "squared": self.squared, "implementation": self.implementation,
                "activation": self.activation, "ignore_index": self.ignore_index,
                "overlap": self.overlap, "tversky_alpha": self.tversky_alpha,
                "tversky_beta": self.tversky_beta,
                "loss": None if self.loss is None else keras.saving.serialize_keras_object(self.loss)}


class _OneQuantity(SegMetrics):
    QUANTITY = None
    DEFAULT_NAME = None

    def __init__(self, class_names=None, num_classes=None, loss=None, name=None, **options):
        options.pop("quantities", None)
        super().__init__(class_names, num_classes, loss, quantities=(self.QUANTITY,),
                         name=name or self.DEFAULT_NAME, **options)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class PerClassDice(_OneQuantity):
    """SegMetrics reporting only `dice/<class>` (soft Dice over the epoch)."""
    QUANTITY, DEFAULT_NAME = "dice", "per_class_dice"


@keras.saving.register_keras_serializable(package=_PACKAGE)
class PerClassIoU(_OneQuantity):
    """SegMetrics reporting only `iou/<class>` (hard IoU over the epoch)."""
    QUANTITY, DEFAULT_NAME = "iou", "per_class_iou"


@keras.saving.register_keras_serializable(package=_PACKAGE)
class PerClassCE(_OneQuantity):
    """SegMetrics reporting only `ce/<class>` (the loss's CE term per class over the epoch)."""
    QUANTITY, DEFAULT_NAME = "ce", "per_class_ce"
