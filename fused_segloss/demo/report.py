"""The demo's per-class table and curves, computed from [B, C, 8] statistics."""
import numpy as np

_CE, _W, _I, _P, _Z, _TP, _HP, _HL = range(8)


def _ratio(numerator, denominator, fallback):
    safe = np.where(denominator > 0, denominator, 1.0)
    return np.where(denominator > 0, numerator / safe, fallback)


def _soft_dice(s, smooth):
    return _ratio(2 * s[..., _I] + smooth, s[..., _P] + s[..., _Z] + smooth, 1.0)


def class_breakdown(stats, ce_weight=1.0, dice_weight=1.0, dice_mode="batch", smooth=1e-5,
                    empty="include", class_weights=None):
    """Per-class terms of the loss (DESIGN §2.3) in float64, with each class's share.

    Returns a dict of [C] arrays: ce, dice (soft Dice over all images), iou, pixels (label
    share of the pixels), contribution (what the class adds to the total: the classes'
    contributions sum to `total`), and the scalar total.
    """
    stats = np.asarray(stats, np.float64)
    totals = stats.sum(axis=0)
    classes = totals.shape[0]
    cw = np.ones(classes) if class_weights is None else np.asarray(class_weights, np.float64)

    ce = _ratio(totals[:, _CE], totals[:, _W], 0.0)
    ce_mask = cw * (totals[:, _W] > 0)
    ce_part = _ratio(ce_mask * ce, np.full(classes, ce_mask.sum()), 0.0)

    dice = _soft_dice(totals, smooth)
    if dice_mode == "batch":
        mask = cw * (totals[:, _Z] > 0) if empty == "exclude" else cw
        dice_part = _ratio(mask * (1 - dice), np.full(classes, mask.sum()), 0.0)
    else:  # the mean over images of each image's class-weighted mean of (1 - Dice)
        image_dice = _soft_dice(stats, smooth)  # [B, C]
        mask = cw * (stats[..., _Z] > 0) if empty == "exclude" else np.broadcast_to(cw, image_dice.shape)
        per_image_sum = mask.sum(axis=1, keepdims=True)
        counted = per_image_sum[:, 0] > 0
        shares = _ratio(mask * (1 - image_dice), np.broadcast_to(per_image_sum, mask.shape), 0.0)
        dice_part = shares[counted].sum(axis=0) / max(int(counted.sum()), 1)

    contribution = ce_weight * ce_part + dice_weight * dice_part
    iou = _ratio(totals[:, _TP], totals[:, _HP] + totals[:, _HL] - totals[:, _TP], 1.0)
    pixels = _ratio(totals[:, _HL], totals[:, _W], 0.0)
    return {"ce": ce, "dice": dice, "iou": iou, "pixels": pixels,
            "contribution": contribution, "total": float(contribution.sum())}


def format_class_table(breakdown, class_names):
    total = breakdown["total"]
    lines = [f"{'class':<8}{'pixels':>9}{'CE':>9}{'soft Dice':>11}{'IoU':>8}{'share of loss':>15}"]
    for c, name in enumerate(class_names):
        share = breakdown["contribution"][c] / total if total > 0 else 0.0
        lines.append(f"{name:<8}{breakdown['pixels'][c]:>8.2%}{breakdown['ce'][c]:>9.4f}"
                     f"{breakdown['dice'][c]:>11.3f}{breakdown['iou'][c]:>8.3f}{share:>15.1%}")
    lines.append(f"{'total':<8}{'':>9}{'':>9}{'':>11}{'':>8}{total:>15.4f}")
    return "\n".join(lines)


def format_comparison(rows, rare_name):
    """rows: (label, breakdown). One line per run: its total and the classes' IoU."""
    header = (f"{'run':<44}{'total loss':>11}{'mean IoU':>10}{'IoU ' + rare_name:>12}"
              f"{rare_name + ' share':>13}")
    lines = [header]
    for label, b in rows:
        rare = b["names"].index(rare_name)
        share = b["contribution"][rare] / b["total"] if b["total"] > 0 else 0.0
        lines.append(f"{label:<44}{b['total']:>11.4f}{np.mean(b['iou']):>10.3f}"
                     f"{b['iou'][rare]:>12.3f}{share:>13.1%}")
    return "\n".join(lines)


def plot_curves(runs, class_names, path):
    """runs: (label, history dict, steps per epoch). One row per run: val IoU, val soft Dice, train CE."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("val_iou", "validation IoU", False), ("val_dice", "validation soft Dice", False),
              ("ce", "training CE (log)", True))
    fig, axes = plt.subplots(len(runs), len(panels), figsize=(4.2 * len(panels), 2.8 * len(runs)),
                             squeeze=False, sharex=True)
    for row, (label, history, steps_per_epoch) in enumerate(runs):
        for col, (key, title, log) in enumerate(panels):
            ax = axes[row][col]
            for name in class_names:
                values = history.get(f"{key}/{name}", [])
                steps = steps_per_epoch * np.arange(1, len(values) + 1)
                ax.plot(steps, values, marker="o", markersize=3, label=name)
            if log:
                ax.set_yscale("log")
            else:
                ax.set_ylim(-0.02, 1.02)
            ax.set_title(f"{label}\n{title}" if col == 0 else title, fontsize=9)
            ax.grid(alpha=0.3)
            if row == len(runs) - 1:
                ax.set_xlabel("training step")
    axes[0][-1].legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
