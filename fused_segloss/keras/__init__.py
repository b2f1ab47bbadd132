"""Keras 3 integration: `SegLoss` (y_pred are logits) and per-class metrics.

    import fused_segloss as fsl
    loss = fsl.keras.SegLoss(class_weights=[1, 1, 1, 1, 4])
    model.compile(optimizer="adam", loss=loss,
                  weighted_metrics=[fsl.keras.SegMetrics(["road", "car", ...], loss=loss)])

See the README's "Keras" section for sample_weight, reductions, mixed precision and tf.distribute.
"""
from ._weights import sample_weight_to_weights
from .loss import SegLoss
from .metrics import PerClassCE, PerClassDice, PerClassIoU, SegMetrics

__all__ = ["SegLoss", "SegMetrics", "PerClassDice", "PerClassIoU", "PerClassCE",
           "sample_weight_to_weights"]
