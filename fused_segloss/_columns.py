"""The eight columns of the [B, C, 8] statistics, named once for the Python side.

The C++ side names them once too (csrc/core/segloss_math.h); the order is the op's
output contract. Each column is a sum over an image's spatial positions, per class:

    CE_SUM        Σ w · ce(x, z)
    WEIGHT_SUM    Σ w
    INTERSECTION  Σ w · p · z
    PRED_SUM      Σ w · p^k
    LABEL_SUM     Σ w · z^k
    HARD_TP       Σ w · [x > 0] · [z ≥ 0.5]
    HARD_PRED     Σ w · [x > 0]
    HARD_LABEL    Σ w · [z ≥ 0.5]

With activation="softmax" (p = softmax over the class axis, z one-hot of a class id or
dense): CE_SUM is Σ w · z · (−log p), WEIGHT_SUM is Σ w · z (the class's labelled weight),
and the hard prediction [x > 0] becomes [argmax x = c].
"""
import enum


class Column(enum.IntEnum):
    """Index of a statistics column: `stats[..., Column.PRED_SUM]`."""

    CE_SUM = 0
    WEIGHT_SUM = 1
    INTERSECTION = 2
    PRED_SUM = 3
    LABEL_SUM = 4
    HARD_TP = 5
    HARD_PRED = 6
    HARD_LABEL = 7


STAT_COLUMNS = tuple(column.name.lower() for column in Column)
