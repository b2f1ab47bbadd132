"""The CUDA build, checked on machines without a GPU (CI): when the op library was built
with CUDA it must carry sm_75/80/90 cubins plus PTX (scripts/check_cuda_build.sh, which
needs cuobjdump from PyPI's nvidia-cuda-cuobjdump) and its DEVICE_GPU kernels must be
registered after loading. Skipped, saying why, for a CPU-only build."""
import glob
import json
import os
import shutil
import site
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _build_info():
    try:
        return json.loads((ROOT / "fused_segloss" / "_build_info.json").read_text())
    except (OSError, ValueError):
        return {}


pytestmark = pytest.mark.skipif(str(_build_info().get("cuda", "")).upper() != "ON",
                                reason="the op library was built without CUDA "
                                       "(FUSED_SEGLOSS_CUDA=OFF or no nvcc)")


def _cuobjdump():
    found = os.environ.get("CUOBJDUMP") or shutil.which("cuobjdump")
    if found:
        return found
    for root in site.getsitepackages() + [site.getusersitepackages()]:
        hits = glob.glob(os.path.join(root, "nvidia", "cu*", "bin", "cuobjdump"))
        if hits:
            return hits[0]
    return None


def test_gpu_kernels_are_registered():
    from tensorflow.python.framework import kernels

    import fused_segloss as fsl

    assert fsl.fused_available()
    for op in ("FusedSeglossStats", "FusedSeglossStatsGrad"):
        devices = {k.device_type for k in kernels.get_registered_kernels_for_op(op).kernel}
        assert {"CPU", "GPU"} <= devices, (op, devices)


@pytest.mark.skipif(_cuobjdump() is None,
                    reason="cuobjdump not found (pip install nvidia-cuda-cuobjdump)")
def test_check_cuda_build_script():
    result = subprocess.run(["bash", str(ROOT / "scripts" / "check_cuda_build.sh")],
                            capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, CUOBJDUMP=_cuobjdump()))
    assert result.returncode == 0, result.stdout + result.stderr
    for sm in ("sm_75", "sm_80", "sm_90"):
        assert f"{sm} cubin" in result.stdout
