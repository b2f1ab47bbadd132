"""The demo: its data, model, per-class breakdown, the CLI, and a quick end-to-end run."""
import os
import re
import subprocess
import sys
import types

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import fused_segloss as fsl  # noqa: E402
from fused_segloss import __main__ as cli  # noqa: E402
from fused_segloss.demo import data, parse_args  # noqa: E402
from fused_segloss.demo.report import class_breakdown, format_class_table  # noqa: E402

BREAKDOWN_OPTIONS = [
    {},
    {"ce_weight": 0.0},
    {"dice_weight": 0.0, "class_weights": [1, 2, 0, 4]},
    {"class_weights": [1, 2, 3, 4], "empty": "exclude", "smooth": 1.0},
    {"dice_mode": "per_image"},
    {"dice_mode": "per_image", "empty": "exclude", "class_weights": [0.5, 1, 1, 3]},
]


@pytest.mark.parametrize("options", BREAKDOWN_OPTIONS)
def test_class_contributions_add_up_to_the_loss(options):
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=2.0, size=(5, 9, 8, 4)).astype(np.float32)
    labels = (rng.random((5, 9, 8, 4)) < [0.4, 0.1, 0.02, 0.0]).astype(np.float32)
    labels[:3, ..., 2] = 0.0  # a class absent from most images; class 3 absent everywhere
    stats = fsl.segloss_stats(logits, labels)
    expected = fsl.combine(stats, **options)
    breakdown = class_breakdown(stats.numpy(), **options)
    np.testing.assert_allclose(breakdown["total"], expected.total.numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(breakdown["ce"], expected.ce_per_class.numpy(), rtol=1e-5)
    np.testing.assert_allclose(breakdown["iou"], expected.iou_per_class.numpy(), rtol=1e-5)
    np.testing.assert_allclose(breakdown["pixels"], labels.mean(axis=(0, 1, 2)), rtol=1e-6)
    assert np.all(breakdown["contribution"] >= 0)
    if options.get("class_weights") and options["class_weights"][2] == 0:
        assert breakdown["contribution"][2] == 0.0  # a class weighted 0 adds nothing
    table = format_class_table(breakdown, ["a", "b", "c", "d"])
    shares = [float(s) for s in re.findall(r"([\d.]+)%\n", table + "\n")]
    assert len(shares) == 4 and abs(sum(shares) - 100.0) < 0.3


def test_synthetic_data_is_multi_label_with_a_rare_class():
    images, labels = data.draw_batch(np.random.default_rng(3), 200, 64)
    assert images.shape == (200, 64, 64, 3) and labels.shape == (200, 64, 64, 5)
    assert set(np.unique(labels)) <= {0.0, 1.0}
    assert (labels.sum(-1) >= 2).mean() > 0.005  # overlapping shapes: multi-hot pixels
    frequency = labels.mean(axis=(0, 1, 2))
    rare = frequency[data.RARE_CLASS]
    assert 0 < rare < 0.002 and rare < frequency.min(initial=1, where=np.arange(5) != data.RARE_CLASS) / 10
    images_with_rare = (labels[..., data.RARE_CLASS].sum(axis=(1, 2)) > 0).mean()
    assert 0.1 < images_with_rare < 0.3
    again = data.draw_batch(np.random.default_rng(3), 200, 64)
    np.testing.assert_array_equal(again[0], images)  # reproducible from the seed


def test_multiclass_data_is_one_class_per_pixel_with_an_ignored_region():
    images, ids = data.draw_batch(np.random.default_rng(3), 200, 64, "multiclass")
    assert images.shape == (200, 64, 64, 3) and ids.shape == (200, 64, 64) and ids.dtype == np.uint8
    assert set(np.unique(ids)) == set(range(len(data.MULTICLASS_NAMES))) | {data.IGNORE_ID}
    labelled = ids != data.IGNORE_ID
    for seed in range(10):  # the same drawing as multi-label masks: the top-most class wins
        _, one = data.draw_multiclass_image(np.random.default_rng(seed), 64)
        _, masks = data.draw_image(np.random.default_rng(seed), 64)
        top = np.where(masks.any(-1), 4 - np.argmax(masks[..., ::-1], axis=-1) + 1, 0)
        keep = one != data.IGNORE_ID
        np.testing.assert_array_equal(one[keep], top[keep])
    assert 0.01 < (~labelled).mean() < 0.1 and 0.1 < (~labelled).any(axis=(1, 2)).mean() < 0.9
    spot = data.MULTICLASS_NAMES.index("spot")
    assert 0 < (ids == spot).mean() < 0.002


def test_unet_is_the_seed_architecture():
    from fused_segloss.demo.unet import build_unet

    model = build_unet(32, 5)
    assert model.output_shape == (None, 32, 32, 5)
    convs = [layer for layer in model.layers if layer.__class__.__name__ == "Conv2D"]
    assert min(c.filters for c in convs[:-1]) == 8 and max(c.filters for c in convs) == 128
    assert model.get_layer("logits").activation.__name__ == "linear"  # logits out


def test_cli_forwards_bench_arguments(monkeypatch):
    received = []
    fake = types.ModuleType("fused_segloss.bench")
    fake.main = lambda argv: received.append(argv) or 0
    monkeypatch.setitem(sys.modules, "fused_segloss.bench", fake)
    monkeypatch.setattr(fsl, "bench", fake, raising=False)
    assert cli.main(["bench", "--quick", "--out", "x.json"]) == 0
    assert received == [["--quick", "--out", "x.json"]]


def test_cli_usage_and_unknown_command(capsys):
    assert cli.main([]) == 2
    assert cli.main(["--help"]) == 0
    assert "demo" in capsys.readouterr().out
    assert cli.main(["train"]) == 2
    assert "unknown command" in capsys.readouterr().err


def test_demo_arguments():
    args = parse_args(["--quick", "--out", "o"])
    assert (args.size, args.steps, args.run_indices, args.out) == (32, 6, [0, 1], "o")
    assert parse_args(["--runs", "5,1", "--verbose", "0"]).run_indices == [0, 4]
    multiclass = parse_args(["--task", "multiclass"])
    assert multiclass.run_indices == [0, 1, 2, 3] and multiclass.class_names[0] == "background"
    assert multiclass.task_options == {"activation": "softmax", "ignore_index": 255}
    for bad in (["--runs", "9"], ["--runs", "a"], ["--size", "40"], ["--steps", "2", "--epochs", "4"],
                ["--task", "multiclass", "--runs", "5"], ["--task", "binary"]):
        with pytest.raises(SystemExit):
            parse_args(bad)


@pytest.mark.slow
@pytest.mark.parametrize("task,names,png_name", [
    ("multilabel", data.CLASS_NAMES, "per_class_curves.png"),
    ("multiclass", data.MULTICLASS_NAMES, "per_class_curves_multiclass.png")])
def test_quick_demo_end_to_end(tmp_path, task, names, png_name):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-m", "fused_segloss", "demo", "--quick", "--task",
                           task, "--out", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    out = proc.stdout
    png = tmp_path / png_name
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert f"per-class curves: {png}" in out
    tables = re.findall(r"class +pixels +CE +soft Dice +IoU +share of loss\n((?:.+\n){%d})"
                        % (len(names) + 1), out)
    assert len(tables) == 2  # the quick mode's two runs
    for table in tables:
        rows = table.splitlines()
        assert [r.split()[0] for r in rows] == list(names) + ["total"]
        shares = [float(r.split()[-1].rstrip("%")) for r in rows[:-1]]
        assert abs(sum(shares) - 100.0) < 0.3
        for row in rows[:-1]:
            ce, dice, iou = (float(v) for v in row.split()[2:5])
            assert ce >= 0 and 0 <= dice <= 1 and 0 <= iou <= 1
    assert "comparison" in out and "IoU spot" in out
