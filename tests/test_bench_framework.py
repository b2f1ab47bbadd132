"""The bench's framework floor (fused_segloss/_bench_framework.py): TensorFlow's smallest
GradientTape step under the anatomy's conditions, and the spread estimate built from it.
No timing assertions (CI machines are noisy): the step computes what it says, every
condition runs before every timed step, and the estimate is the formula it documents."""
import numpy as np
import pytest

from fused_segloss import _bench_anatomy, _bench_framework
from fused_segloss import _bench_paths as bp


@pytest.mark.parametrize("mode", _bench_framework.MODES)
def test_smallest_step_is_a_sum_and_its_gradient(mode):
    step = _bench_framework.smallest_step(mode, batch=3, classes=2)
    y, grad = step()
    expected = np.linspace(-1.0, 1.0, 3 * 2 * 8, dtype=np.float32)
    assert y.numpy() == pytest.approx(float(expected.sum()), abs=1e-5)
    assert grad.shape == (3, 2, 8)
    np.testing.assert_array_equal(grad.numpy(), np.ones([3, 2, 8], np.float32))


def test_smallest_step_names_a_bad_mode():
    with pytest.raises(ValueError, match="`mode` must be one of"):
        _bench_framework.smallest_step("graph", batch=1, classes=1)


def test_measure_runs_each_condition_before_every_step(monkeypatch):
    calls = {"first": 0, "second": 0}

    def counting(name):
        return lambda: calls.__setitem__(name, calls[name] + 1)

    monkeypatch.setattr(_bench_framework._bench_anatomy, "conditions",
                        lambda write_mib, idle_s: [("first", counting("first")),
                                                   ("second", counting("second"))])
    results = _bench_framework.measure(batch=2, classes=3, steps=4, warmup=1)
    assert [(r.mode, r.condition) for r in results] == [
        (mode, name) for mode in _bench_framework.MODES for name in ("first", "second")]
    assert all(r.steps == 4 and r.median_ms > 0 for r in results)
    # once per warm-up and timed step, in every mode
    assert calls == {"first": 3 * 5, "second": 3 * 5}


def test_measure_uses_the_anatomy_conditions():
    results = _bench_framework.measure(batch=1, classes=1, steps=1, warmup=0, write_mib=1,
                                       idle_s=0.01)
    names = [name for name, _ in _bench_anatomy.conditions(write_mib=1, idle_s=0.01)]
    assert [r.condition for r in results] == names * len(_bench_framework.MODES)


def _anatomy(condition, size, step_ms):
    shape = bp.CaseShape(8, size, 5)
    return _bench_anatomy.ConditionAnatomy(
        condition, _bench_anatomy.Anatomy(shape, 20, step_ms, [], step_ms / 2))


def test_spread_estimate_is_the_documented_formula():
    conditions = [_anatomy("back to back", 256, 4.0), _anatomy("back to back", 1024, 50.0),
                  _anatomy("back to back", 512, 14.0), _anatomy("after idle", 256, 9.0)]
    smallest = [_bench_framework.SmallestStep("eager", "back to back", 20, 0.8),
                _bench_framework.SmallestStep("XLA", "back to back", 20, 0.1),
                _bench_framework.SmallestStep("eager", "after idle", 20, 2.0)]
    estimates = _bench_framework.spread_estimates(conditions, smallest)
    # 1 + 0.8 ms / (256² x 8 x 5 elements x the 1024² step's ms per element); only the eager
    # smallest step counts, and a condition measured at one size has no estimate.
    per_element = 50.0 / (8 * 1024 * 1024 * 5)
    assert estimates == {"back to back": pytest.approx(1 + 0.8 / (per_element * 8 * 256**2 * 5))}
    assert estimates["back to back"] == pytest.approx(1.256, abs=1e-3)
    table = _bench_framework.table(smallest, conditions, batch=8, classes=5)
    assert "back to back 1.26" in table.splitlines()[-1]
    assert "256²-1024²" in table
    eager_row = next(line for line in table.splitlines() if line.startswith("eager"))
    assert eager_row.split()[1:] == ["0.800", "2.000"]
    assert _bench_framework.spread_estimates(conditions[:1], smallest) == {}
