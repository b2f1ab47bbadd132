"""Builds the TF-free CUDA launcher library libfused_segloss_cuda.so with nvcc alone.

No TensorFlow, no CMake: the .cu kernels of csrc/cuda, their C ABI (segloss_cuda_capi.cc)
and the CPU core (csrc/core/*.cc, for comparisons on the same inputs), linked
with a private static cudart. Used by check_gpu.py on GPU machines without TF; the main
CMake build makes the same library (FUSED_SEGLOSS_CUDA=ON) from its own objects.

    python tests/gpu/build_standalone.py [--arch 90] [--out DIR] [-D NAME=VALUE ...]

--arch: SM numbers separated by commas ("75,80,90"); default: the visible GPU's compute
capability from nvidia-smi, else 75,80,90. The library is cached by a hash of the sources
and options under --out (default /tmp/fused_segloss_cuda_build).
"""
import argparse
import concurrent.futures
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CUDA_DIR = ROOT / "csrc" / "cuda"
CORE_DIR = ROOT / "csrc" / "core"


def find_nvcc():
    for candidate in (os.environ.get("NVCC"), shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if candidate and Path(candidate).exists():
            return candidate
    raise SystemExit("build_standalone: nvcc not found (set NVCC=/path/to/nvcc)")


def visible_gpu_arch():
    """The first GPU's compute capability as an SM number ("90"), or None."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    line = out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else ""
    return line.replace(".", "") if line.replace(".", "").isdigit() else None


def sources():
    cu = sorted(CUDA_DIR.glob("*.cu"))
    cc = [CUDA_DIR / "segloss_cuda_capi.cc", *sorted(CORE_DIR.glob("*.cc"))]
    headers = sorted(CUDA_DIR.glob("*.h")) + sorted(CUDA_DIR.glob("*.cuh")) + sorted(CORE_DIR.glob("*.h"))
    return cu, cc, headers


def build(arch=None, out=None, defines=(), verbose=True):
    """Returns the path of the built (or cached) library."""
    nvcc = find_nvcc()
    sms = sorted({int(a) for a in (arch or visible_gpu_arch() or "75,80,90").split(",")})
    cu, cc, headers = sources()
    key = hashlib.sha256()
    for path in cu + cc + headers:
        key.update(path.name.encode() + path.read_bytes())
    key.update(repr((sms, sorted(defines), nvcc)).encode())
    build_dir = Path(out or "/tmp/fused_segloss_cuda_build") / key.hexdigest()[:16]
    library = build_dir / "libfused_segloss_cuda.so"
    if library.exists():
        return library
    build_dir.mkdir(parents=True, exist_ok=True)
    # One front-end pass (PTX of the lowest SM, kept for newer GPUs), a cubin per SM.
    codes = ",".join([f"compute_{sms[0]}"] + [f"sm_{s}" for s in sms])
    common = ["-std=c++17", "-O3", f"-I{CORE_DIR}", f"-I{CUDA_DIR}"] + [f"-D{d}" for d in defines]
    jobs = []
    for src in cu:
        jobs.append([nvcc, *common, f"--generate-code=arch=compute_{sms[0]},code=[{codes}]",
                     "-Xfatbin=-compress-all",
                     "-Xcompiler", "-fPIC", "-c", str(src), "-o", str(build_dir / (src.stem + ".o"))])
    for src in cc:
        jobs.append([nvcc, *common, "-Xcompiler", "-fPIC", "-c", str(src),
                     "-o", str(build_dir / (src.stem + ".o"))])
    if verbose:
        print(f"build_standalone: compiling {len(jobs)} files for sm_{', sm_'.join(map(str, sms))} "
              f"into {build_dir}", flush=True)
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        results = list(pool.map(lambda cmd: subprocess.run(cmd, capture_output=True, text=True), jobs))
    for cmd, result in zip(jobs, results):
        if result.returncode != 0:
            raise SystemExit(f"build_standalone: failed: {' '.join(cmd)}\n{result.stderr}")
    objects = [str(build_dir / (src.stem + ".o")) for src in cu + cc]
    tmp = build_dir / "libfused_segloss_cuda.so.tmp"
    link = [nvcc, "-shared", "-cudart=static", "-Xlinker", "--exclude-libs,libcudart_static.a",
            "-o", str(tmp), *objects]
    result = subprocess.run(link, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"build_standalone: link failed: {' '.join(link)}\n{result.stderr}")
    os.replace(tmp, library)
    return library


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", help="SM numbers, comma separated (default: the visible GPU)")
    parser.add_argument("--out", help="cache directory (default /tmp/fused_segloss_cuda_build)")
    parser.add_argument("-D", dest="defines", action="append", default=[],
                        help="extra preprocessor definition for the kernels")
    args = parser.parse_args(argv)
    print(build(args.arch, args.out, args.defines))


if __name__ == "__main__":
    sys.exit(main())
