"""The package as users install it: a wheel (what `pip install <path or git URL>` builds
too), installed into its own directory and used from a fresh process outside the source
tree, so nothing from the checkout or an editable install can stand in for it."""
import glob
import json
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

USE_INSTALLED = textwrap.dedent("""
    import json, os, sys
    import numpy as np
    import tensorflow as tf
    import fused_segloss as fsl
    import fused_segloss.keras, fused_segloss.demo, fused_segloss.demo.run
    from fused_segloss import _loader

    rng = np.random.default_rng(0)
    logits = tf.constant(rng.normal(size=(2, 5, 3)), tf.float32)
    labels = tf.constant(rng.random((2, 5, 3)) < 0.5)
    with tf.GradientTape() as tape:
        tape.watch(logits)
        loss = fsl.seg_loss(logits, labels, implementation="fused")
    grad = tape.gradient(loss, logits)
    with tf.GradientTape() as tape:
        tape.watch(logits)
        expected = fsl.seg_loss(logits, labels, implementation="reference")
    expected_grad = tape.gradient(expected, logits)
    print(json.dumps({
        "package": os.path.dirname(fsl.__file__),
        "library": _loader.status().path,
        "fused_available": fsl.fused_available(),
        "loss": float(loss), "expected": float(expected),
        "grad_error": float(tf.reduce_max(tf.abs(grad - expected_grad))),
        "keras_loss": type(fused_segloss.keras.SegLoss()).__name__,
        "version": fsl.__version__,
    }))
""")


@pytest.mark.slow
def test_wheel_installs_every_subpackage_and_loads_the_library(tmp_path):
    wheels, target = tmp_path / "wheels", tmp_path / "site"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q",
         "-w", str(wheels), ROOT], capture_output=True, text=True, timeout=1200)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    (wheel,) = glob.glob(str(wheels / "fused_segloss-*.whl"))
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
         wheel], capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr[-3000:]

    # Only the installed copy on the path: the test runs from an empty directory, and
    # PYTHONPATH holds nothing but the target (an editable install's finder is skipped
    # because the target comes first and holds the package).
    env = dict(os.environ, PYTHONPATH=str(target), TF_CPP_MIN_LOG_LEVEL="2",
               CUDA_VISIBLE_DEVICES="")
    run = subprocess.run([sys.executable, "-c", USE_INSTALLED], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["package"] == str(target / "fused_segloss")
    assert report["fused_available"], report
    assert report["library"].startswith(str(target)), report
    assert report["loss"] == pytest.approx(report["expected"], rel=1e-5)
    assert report["grad_error"] < 1e-6
    assert report["keras_loss"] == "SegLoss"
