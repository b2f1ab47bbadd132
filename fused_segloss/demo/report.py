"""The demo's per-class table and curves, from [B, C, 8] statistics through `combine`."""
import numpy as np

from .. import Column, combine


def class_breakdown(stats, **combine_options):
    """Per-class terms of the loss, from `combine` itself, with each class's share.

    Returns a dict of [C] arrays: ce, dice, iou, pixels (label share of the weighted
    pixels: of the class's own elements with sigmoid, of all labelled pixels with softmax,
    where weight_sum is each class's labelled weight), contribution (what the class adds
    to the total; they sum to `total`), and the scalar total.
    """
    result = combine(stats, **combine_options)
    totals = np.asarray(stats, np.float64).sum(axis=0)
    weight = totals[:, Column.WEIGHT_SUM]
    if combine_options.get("activation") == "softmax":
        weight = np.full_like(weight, weight.sum())
    pixels = np.divide(totals[:, Column.HARD_LABEL], weight, out=np.zeros_like(weight),
                       where=weight > 0)
    return {"ce": result.ce_per_class.numpy(), "dice": result.dice_per_class.numpy(),
            "iou": result.iou_per_class.numpy(), "pixels": pixels,
            "contribution": result.loss_per_class.numpy(), "total": float(result.total)}


def format_class_table(breakdown, class_names):
    total = breakdown["total"]
    width = max(8, max(len(name) for name in class_names) + 2)
    lines = [f"{'class':<{width}}{'pixels':>9}{'CE':>9}{'soft Dice':>11}{'IoU':>8}"
             f"{'share of loss':>15}"]
    for c, name in enumerate(class_names):
        share = breakdown["contribution"][c] / total if total > 0 else 0.0
        lines.append(f"{name:<{width}}{breakdown['pixels'][c]:>8.2%}{breakdown['ce'][c]:>9.4f}"
                     f"{breakdown['dice'][c]:>11.3f}{breakdown['iou'][c]:>8.3f}{share:>15.1%}")
    lines.append(f"{'total':<{width}}{'':>9}{'':>9}{'':>11}{'':>8}{total:>15.4f}")
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
