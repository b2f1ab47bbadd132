"""implementation="reference", and the automatic fallback when the op library is missing
or was built for another TensorFlow: one FusedSeglossFallbackWarning naming
the reason and the build command, the reference's results, and an error (not a silent
fallback) for implementation="fused". At the end, load_library()'s own explanations of a
library built for another TensorFlow or not loadable at all."""
import json
import os
import shutil
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import tensorflow as tf

import fused_segloss as fsl
from fused_segloss import _loader

needs_library = pytest.mark.skipif(not fsl.fused_available(),
                                   reason="needs the compiled op library")


@pytest.fixture
def inputs(rng):
    x = rng.normal(0.0, 3.0, (2, 9, 7, 3)).astype(np.float32)
    z = (rng.random(x.shape) < 0.4).astype(np.uint8)
    w = rng.uniform(0.0, 2.0, (2, 9, 7, 1)).astype(np.float32)
    return x, z, w


def _op_types(implementation, x, z, w):
    @tf.function
    def loss(logits):
        return fsl.seg_loss(logits, z, w, implementation=implementation)

    graph = loss.get_concrete_function(tf.TensorSpec(x.shape, tf.float32)).graph
    return {op.type for op in graph.get_operations()}


@needs_library
def test_implementation_selects_the_path(inputs):
    x, z, w = inputs
    assert "FusedSeglossStats" in _op_types("fused", x, z, w)
    assert "FusedSeglossStats" in _op_types("auto", x, z, w)
    assert "FusedSeglossStats" not in _op_types("reference", x, z, w)
    # The reference path is exactly fused_segloss.reference.
    forced = fsl.segloss_stats(x, z, w, implementation="reference").numpy()
    direct = fsl.reference.segloss_stats(x, z, w).numpy()
    assert forced.tobytes() == direct.tobytes()


def test_bad_implementation_name_is_rejected(inputs):
    x, z, _ = inputs
    with pytest.raises(ValueError, match="implementation"):
        fsl.segloss_stats(x, z, implementation="xla")


@pytest.fixture
def simulated_status():
    """Replace the loader's cached status for one test; restore it afterwards."""
    original = _loader.status()
    yield lambda status: _loader._reset_for_tests(status)
    _loader._reset_for_tests(original)


def _fallback_warnings(caught):
    return [w for w in caught if issubclass(w.category, fsl.FusedSeglossFallbackWarning)]


def _assert_falls_back_once(x, z, w, reason_parts):
    """Three calls: one warning (naming the reason and the build command), reference
    results and gradients every time."""
    expected = fsl.reference.segloss_stats(x, z, w).numpy()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            logits = tf.constant(x)
            with tf.GradientTape() as tape:
                tape.watch(logits)
                stats = fsl.segloss_stats(logits, z, w)
            grad = tape.gradient(stats, logits, output_gradients=tf.ones_like(stats))
            assert stats.numpy().tobytes() == expected.tobytes()
            assert grad is not None and np.isfinite(grad.numpy()).all()
    found = _fallback_warnings(caught)
    assert len(found) == 1, [str(w.message) for w in found]
    message = str(found[0].message)
    for part in (*reason_parts, _loader.BUILD_COMMAND):
        assert part in message, (part, message)


def test_missing_library_falls_back_with_one_warning(simulated_status, inputs):
    simulated_status(_loader.LibraryStatus(reason="simulated: _segloss_ops.so is missing"))
    assert not fsl.fused_available()
    _assert_falls_back_once(*inputs, ["simulated: _segloss_ops.so is missing"])


def test_fused_without_library_raises(simulated_status, inputs):
    simulated_status(_loader.LibraryStatus(reason="simulated: _segloss_ops.so is missing"))
    x, z, _ = inputs
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(RuntimeError) as info:
            fsl.seg_loss(x, z, implementation="fused")
    assert "simulated: _segloss_ops.so is missing" in str(info.value)
    assert _loader.BUILD_COMMAND in str(info.value)
    assert not _fallback_warnings(caught)  # an error, not a warning
    # implementation="reference" needs no library and does not warn either.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fsl.seg_loss(x, z, implementation="reference")
    assert not _fallback_warnings(caught)


def test_library_for_another_tensorflow_is_refused(simulated_status, monkeypatch, inputs):
    monkeypatch.setattr(_loader, "_read_build_info",
                        lambda: {"tensorflow_version": "2.0.0-elsewhere"})
    status = _loader.load_library()
    assert not status.available
    assert "2.0.0-elsewhere" in status.reason and tf.__version__ in status.reason
    simulated_status(status)
    _assert_falls_back_once(*inputs, ["2.0.0-elsewhere", tf.__version__])


# ----------------------------------------------------------------------------------------
# End to end, in fresh interpreters: the environment switch, and a copy of the package
# whose library is absent or whose build record names another TensorFlow.

_PROBE = textwrap.dedent("""
    import json, warnings
    import numpy as np
    import fused_segloss as fsl
    report = {"file": fsl.__file__, "available": fsl.fused_available()}
    x = np.linspace(-3, 3, 2 * 5 * 3, dtype=np.float32).reshape(2, 5, 3)
    z = (x > 0.5).astype(np.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        losses = [float(fsl.seg_loss(x, z)) for _ in range(3)]
    report["warnings"] = [str(w.message) for w in caught
                          if issubclass(w.category, fsl.FusedSeglossFallbackWarning)]
    report["loss_matches_reference"] = all(
        l == float(fsl.combine(fsl.reference.segloss_stats(x, z)).total) for l in losses)
    try:
        fsl.seg_loss(x, z, implementation="fused")
        report["fused_error"] = None
    except RuntimeError as exc:
        report["fused_error"] = str(exc)
    print("REPORT" + json.dumps(report))
""")


def _run_probe(tmp_path, env_extra, pythonpath=None):
    script = tmp_path / "probe.py"
    script.write_text(_PROBE)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env.pop(_loader.DISABLE_ENV, None)
    env.update(env_extra)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("REPORT"))
    return json.loads(line[len("REPORT"):])


def _assert_probe_fell_back(report, reason_parts):
    assert report["available"] is False
    assert len(report["warnings"]) == 1, report["warnings"]
    for part in (*reason_parts, _loader.BUILD_COMMAND):
        assert part in report["warnings"][0], (part, report["warnings"][0])
        assert part in report["fused_error"], (part, report["fused_error"])
    assert report["loss_matches_reference"]


@pytest.mark.slow
def test_environment_switch_disables_the_library(tmp_path):
    report = _run_probe(tmp_path, {_loader.DISABLE_ENV: "1"})
    _assert_probe_fell_back(report, [_loader.DISABLE_ENV])


def _package_copy(tmp_path, keep_library=True, build_info=None):
    source = os.path.dirname(fsl.__file__)
    target = tmp_path / "site" / "fused_segloss"
    ignore = ["__pycache__"] + ([] if keep_library else ["_segloss_ops*.so"])
    shutil.copytree(source, target, ignore=shutil.ignore_patterns(*ignore))
    if build_info is not None:
        (target / "_build_info.json").write_text(json.dumps(build_info))
    return str(tmp_path / "site")


@pytest.mark.slow
@needs_library
def test_copy_built_for_another_tensorflow_falls_back(tmp_path):
    info = dict(_loader._read_build_info(), tensorflow_version="2.0.0-elsewhere")
    site = _package_copy(tmp_path, build_info=info)
    report = _run_probe(tmp_path, {}, pythonpath=site)
    assert report["file"].startswith(site), report["file"]
    _assert_probe_fell_back(report, ["2.0.0-elsewhere", tf.__version__])


@pytest.mark.slow
def test_copy_without_the_library_falls_back(tmp_path):
    site = _package_copy(tmp_path, keep_library=False)
    report = _run_probe(tmp_path, {}, pythonpath=site)
    assert report["file"].startswith(site), report["file"]
    _assert_probe_fell_back(report, ["_segloss_ops"])


# ---------------------------------------------------------------------------- load_library()
def test_library_built_for_another_tf_version_is_explained(tmp_path, monkeypatch):
    """load_library() on a copy of the built library whose build record names another
    TensorFlow: refused with both versions named (what the package then does: the tests
    above)."""
    if _loader.status().path is None:
        pytest.skip("the op library is not built")
    shutil.copy(_loader.status().path, tmp_path / "_segloss_ops.so")
    (tmp_path / "_build_info.json").write_text(json.dumps({"tensorflow_version": "1.15.0"}))
    monkeypatch.setattr(_loader, "_HERE", str(tmp_path))
    status = _loader.load_library()
    assert not status.available
    assert "1.15.0" in status.reason and tf.__version__ in status.reason
    assert "rebuild" in status.reason


def test_corrupt_library_file_is_explained(tmp_path, monkeypatch):
    (tmp_path / "_segloss_ops.so").write_text("not an ELF file")
    monkeypatch.setattr(_loader, "_HERE", str(tmp_path))
    status = _loader.load_library()
    assert not status.available
    assert "_segloss_ops.so" in status.reason and "failed" in status.reason
