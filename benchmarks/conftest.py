"""pytest-benchmark suites of fused_segloss: shared inputs, a NumPy oracle, the ratio summary.

    python -m pytest benchmarks/                     # 8x512x512x5
    FSL_BENCH_SIZE=64 python -m pytest benchmarks/   # smaller images (CI uses 16)

Each group's benchmarks print together (pytest-benchmark groups by the `group` mark); at the
end a summary prints, per group, each benchmark's median over its group's baseline median
(fused eager for the path groups, float32 channels_last for the variants), from this run.
"""
import pytest
from fsl_bench_support import BATCH, CLASSES, SIZE, expected_total

# group -> {"baseline": label, "medians": {label: median seconds}} in the order they ran
_BOARD = {}


class RatioBoard:
    """Collects each benchmark's median for the closing summary."""

    def record(self, group, label, benchmark, baseline):
        stats = getattr(benchmark, "stats", None)
        if stats is None:  # --benchmark-disable: nothing was timed
            return
        entry = _BOARD.setdefault(group, {"baseline": baseline, "medians": {}})
        entry["medians"][label] = stats.stats.median


@pytest.fixture(scope="session")
def ratio_board():
    return RatioBoard()


@pytest.fixture(scope="session")
def seg_inputs():
    from fused_segloss import _bench_paths as bp

    shape = bp.CaseShape(BATCH, SIZE, CLASSES)
    return shape, bp.make_inputs(shape)


@pytest.fixture(scope="session")
def expected_loss(seg_inputs):
    _, (logits, labels, _) = seg_inputs
    return expected_total(logits.numpy(), labels.numpy())


def ratio_lines(board):
    """The summary text: per group, each label's median and its ratio to the baseline's."""
    lines = []
    for group, entry in board.items():
        base = entry["medians"].get(entry["baseline"])
        lines.append(f"{group}: median, and median / {entry['baseline']} median "
                     f"(>1 means slower)")
        for label, median in entry["medians"].items():
            ratio = f"{median / base:8.2f}x" if base else "        -"
            lines.append(f"  {label:<44}{median * 1e3:10.2f} ms {ratio}")
    return lines


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter):
    if _BOARD:
        terminalreporter.write_line("")
        terminalreporter.write_line("fused_segloss benchmark ratios (this run)")
        for line in ratio_lines(_BOARD):
            terminalreporter.write_line(line)
