"""The CUDA kernels on a real GPU. Every test here skips, saying why, when no GPU is visible
(CI and the development machines have none; tests/test_cuda_host_simulation.py checks the
kernels' logic on the host there).

- TensorFlow path: the DEVICE_GPU OpKernels against the CPU OpKernels (both compiled into
  the op library) and the float64 NumPy oracle: needs TF to see a GPU and the library to
  be built with CUDA.
- Standalone path: tests/gpu/check_gpu.py --quick (CuPy or PyTorch, no TF involved).
"""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

import fused_segloss as fsl
import numpy_reference as ref

pytestmark = pytest.mark.gpu

ROOT = Path(__file__).resolve().parents[1]


def _built_with_cuda():
    try:
        info = json.loads((ROOT / "fused_segloss" / "_build_info.json").read_text())
    except (OSError, ValueError):
        return False
    return str(info.get("cuda", "")).upper() == "ON"


def _tf_gpu_skip_reason():
    if not tf.config.list_physical_devices("GPU"):
        return "no GPU visible to TensorFlow"
    if not _built_with_cuda():
        return "the op library was built without CUDA (FUSED_SEGLOSS_CUDA=OFF or no nvcc)"
    if not fsl.fused_available():
        return "the fused op library is not loaded"
    return None


needs_tf_gpu = pytest.mark.skipif(_tf_gpu_skip_reason() is not None,
                                  reason=str(_tf_gpu_skip_reason()))


def _run(device, problem, grad_stats):
    logits, labels, weights, pos_weight, data_format, squared = problem
    with tf.device(device):
        x = tf.constant(logits)
        with tf.GradientTape() as tape:
            tape.watch(x)
            stats = fsl.segloss_stats(x, labels, weights, pos_weight, data_format=data_format,
                                      squared=squared, implementation="fused")
            loss = tf.reduce_sum(stats * grad_stats)
        grad = tape.gradient(loss, x)
    return stats.numpy(), grad.numpy(), stats.device


@needs_tf_gpu
@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
@pytest.mark.parametrize("logits_dtype,labels_dtype,classes,weights", [
    ("float32", "float32", 5, "pixel"),
    ("float16", "uint8", 1, None),
    ("bfloat16", "bool", 100, "class"),
    ("float64", "float32", 3, "full"),
])
def test_tf_gpu_kernels_match_cpu_and_oracle(problem, check, data_format, logits_dtype,
                                             labels_dtype, classes, weights, rng):
    p = problem(batch=3, spatial=(37, 41), classes=classes, data_format=data_format,
                logits_dtype=logits_dtype, labels_dtype=labels_dtype, weights=weights,
                pos_weight=True, squared=True, soft=labels_dtype not in ("uint8", "bool"))
    grad_stats = rng.normal(size=(3, classes, 8)).astype(np.float32)
    gpu_stats, gpu_grad, device = _run("/GPU:0", p, grad_stats)
    assert "GPU" in device.upper(), f"the op ran on {device}"
    cpu_stats, cpu_grad, _ = _run("/CPU:0", p, grad_stats)
    expected = ref.stats(*p.args()[0], **p.args()[1])
    check.stats(gpu_stats, expected, logits_dtype, what="GPU stats vs NumPy")
    check.stats(gpu_stats, cpu_stats.astype(np.float64), logits_dtype, what="GPU vs CPU stats")
    g_expected = ref.logit_grad(*p.args()[0], grad_stats, **p.args()[1])
    scale = ref.logit_grad_scale(*p.args()[0], grad_stats, **p.args()[1])
    check.grad(gpu_grad, g_expected, scale, logits_dtype, what="GPU gradient vs NumPy")


@needs_tf_gpu
def test_tf_gpu_forward_is_deterministic(problem):
    p = problem(batch=4, spatial=(256, 255), classes=5, weights="pixel")
    grad_stats = np.ones((4, 5, 8), np.float32)
    first, _, _ = _run("/GPU:0", p, grad_stats)
    second, _, _ = _run("/GPU:0", p, grad_stats)
    np.testing.assert_array_equal(first.view(np.uint32), second.view(np.uint32))


@needs_tf_gpu
def test_tf_gpu_invalid_labels_raise(problem):
    p = problem(batch=2, spatial=(33,), classes=3)
    labels = p.labels.copy()
    labels[0, 5, 1] = 1.5
    with tf.device("/GPU:0"), pytest.raises(tf.errors.InvalidArgumentError, match="labels"):
        fsl.segloss_stats(p.logits, labels, implementation="fused")


def _standalone_skip_reason():
    if importlib.util.find_spec("cupy") is None and importlib.util.find_spec("torch") is None:
        return "neither CuPy nor PyTorch is installed (tests/gpu/check_gpu.py needs one)"
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "nvidia-smi not available: no GPU visible"
    if out.returncode != 0 or "GPU" not in out.stdout:
        return "nvidia-smi lists no GPU"
    return None


@pytest.mark.skipif(_standalone_skip_reason() is not None,
                    reason=str(_standalone_skip_reason()))
def test_standalone_check_gpu_script():
    script = ROOT / "tests" / "gpu" / "check_gpu.py"
    result = subprocess.run([sys.executable, str(script), "--quick"], capture_output=True,
                            text=True, timeout=1800)
    print(result.stdout[-6000:])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "all checks passed" in result.stdout
