#!/usr/bin/env bash
# CI check of a CUDA build (FUSED_SEGLOSS_CUDA=ON) on a machine without a GPU:
#   1. the op library carries sm_75, sm_80 and sm_90 cubins and PTX (cuobjdump --list-elf,
#      --list-ptx);
#   2. it still loads with tf.load_op_library, with CPU and GPU kernels registered for both
#      ops (the CUDA runtime is linked statically and only initialised on first use, so a
#      machine without a driver loads the library fine).
#
#   scripts/check_cuda_build.sh [path/to/_segloss_ops*.so]
#
# cuobjdump: $CUOBJDUMP, else on PATH, else the one of PyPI's nvidia-cuda-cuobjdump
# (pip install nvidia-cuda-cuobjdump; it installs nvidia/cu13/bin/cuobjdump).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
LIB=${1:-$(ls fused_segloss/_segloss_ops*.so 2>/dev/null | head -n1)}
[[ -n "$LIB" && -f "$LIB" ]] || { echo "check_cuda_build: no op library found (build first)"; exit 1; }

CUOBJDUMP=${CUOBJDUMP:-$(command -v cuobjdump || true)}
if [[ -z "$CUOBJDUMP" ]]; then
  CUOBJDUMP=$("$PYTHON" - <<'PY'
import glob, os, site, sys
roots = site.getsitepackages() + [site.getusersitepackages()]
hits = [p for r in roots for p in glob.glob(os.path.join(r, "nvidia", "cu*", "bin", "cuobjdump"))]
print(hits[0] if hits else "")
PY
)
fi
[[ -n "$CUOBJDUMP" && -x "$CUOBJDUMP" ]] || {
  echo "check_cuda_build: cuobjdump not found; pip install nvidia-cuda-cuobjdump"; exit 1; }

status=0
elf=$("$CUOBJDUMP" --list-elf "$LIB" 2>&1 || true)
for sm in sm_75 sm_80 sm_90; do
  count=$(grep -c "\.$sm\." <<<"$elf" || true)
  if [[ "$count" -gt 0 ]]; then
    echo "ok   $LIB: $count $sm cubin(s)"
  else
    echo "FAIL $LIB: no $sm cubin (cuobjdump --list-elf says: $(head -c 300 <<<"$elf"))"
    status=1
  fi
done
ptx=$("$CUOBJDUMP" --list-ptx "$LIB" 2>&1 | grep -c "PTX file" || true)
if [[ "$ptx" -gt 0 ]]; then
  echo "ok   $LIB: $ptx PTX file(s) ($(sed -n 's/.*\.\(sm_[0-9]*\)\.ptx$/\1/p' <<<"$("$CUOBJDUMP" --list-ptx "$LIB")" | sort -u | tr '\n' ' '))"
else
  echo "FAIL $LIB: no PTX for newer GPUs"; status=1
fi

TF_CPP_MIN_LOG_LEVEL=2 "$PYTHON" - "$LIB" <<'PY' || status=1
import sys
import tensorflow as tf
from tensorflow.python.framework import kernels

path = sys.argv[1]
tf.load_op_library(path)
ok = True
for op in ("FusedSeglossStats", "FusedSeglossStatsGrad"):
    devices = sorted({k.device_type for k in kernels.get_registered_kernels_for_op(op).kernel})
    good = {"CPU", "GPU"} <= set(devices)
    ok &= good
    print(f"{'ok  ' if good else 'FAIL'} {path}: {op} kernels registered for {devices}")
print(f"ok   tf.load_op_library on a machine with GPUs {tf.config.list_physical_devices('GPU')}")
sys.exit(0 if ok else 1)
PY
[[ $status -eq 0 ]] && echo "check_cuda_build: passed" || echo "check_cuda_build: FAILED"
exit $status
