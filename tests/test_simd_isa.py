"""simd.h's mask operations built for every instruction set this CPU runs.

The CPU core is built for the machine's own instruction set (-march=native), so CI runs
only one of simd.h's mask representations: mask registers with AVX-512, all-ones vector
lanes with AVX2 or SSE2. tests/native/simd_mask_probe.cc applies each mask operation
(comparisons, Not, &, |, Select, AddWhere, FirstLanes, AnyLane) to the same values, built
once per instruction set; every build must give NumPy's answer, bit for bit. The values
include NaN, ±0, ±inf and the hard-count thresholds 0 and 0.5 on both sides.
"""
import os
import shutil
import subprocess

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE = os.path.join(ROOT, "tests", "native", "simd_mask_probe.cc")
CORE = os.path.join(ROOT, "csrc", "core")
# (name, g++ flags, the /proc/cpuinfo flags the build needs to run)
ISAS = [("sse2", ["-march=x86-64"], []),
        ("avx2", ["-march=x86-64-v3"], ["avx2", "fma"]),
        ("avx512", ["-march=x86-64-v4"], ["avx512f", "avx512bw", "avx512dq", "avx512vl"])]


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _inputs():
    special = np.array([np.nan, -np.nan, 0.0, -0.0, 0.5, np.nextafter(0.5, 0), 1.0, -1.0,
                        np.inf, -np.inf, 1e-45, -1e-45, 3.0, -2.5, 0.25, 0.75], np.float32)
    rng = np.random.default_rng(7)
    a = np.concatenate([np.repeat(special, len(special)), rng.normal(0, 1, 256)])
    b = np.concatenate([np.tile(special, len(special)), rng.normal(0, 1, 256)])
    return a.astype(np.float32), b.astype(np.float32)


def _run(tmp_path, name, flags, a, b):
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        pytest.skip(f"no C++ compiler {cxx!r}")
    exe = tmp_path / f"probe_{name}"
    build = subprocess.run([cxx, "-std=c++17", "-O2", *flags, "-I", CORE, PROBE, "-o", str(exe)],
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-2000:]
    words = " ".join(f"{v:08x}" for v in np.concatenate([a, b]).view(np.uint32))
    run = subprocess.run([str(exe)], input=f"{len(a)} {words}\n", capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    return run.stdout


def _parse(out):
    results, any_lane, width = {}, {}, None
    for line in out.splitlines():
        parts = line.split()
        if parts[0] == "width":
            width = int(parts[1])
        elif parts[0] == "any":
            any_lane[int(parts[1])] = int(parts[2])
        else:
            results.setdefault(parts[0], {})[int(parts[1])] = int(parts[2], 16)
    arrays = {k: np.array([v[i] for i in range(len(v))], np.uint32)
              for k, v in results.items()}
    return arrays, any_lane, width


def _expected(a, b):
    one, zero = np.float32(1), np.float32(0)
    flag = lambda m: np.where(m, one, zero).astype(np.float32).view(np.uint32)
    with np.errstate(invalid="ignore", over="ignore"):
        return {
            "lt": flag(a < b), "le": flag(a <= b), "gt": flag(a > b), "ge": flag(a >= b),
            "not_lt": flag(~(a < b)),
            "and": flag((a > 0) & (b >= 0.5)), "or": flag((a > 0) | (b >= 0.5)),
            "select_gt": np.where(a > b, a, b).astype(np.float32).view(np.uint32),
            "add_where_ge": np.where(a >= b, a + b, a).astype(np.float32).view(np.uint32),
        }


@pytest.mark.parametrize("name,flags,needs", ISAS, ids=[i[0] for i in ISAS])
def test_mask_operations_match_numpy(tmp_path, name, flags, needs):
    missing = [f for f in needs if f not in _cpu_flags()]
    if missing:
        pytest.skip(f"this CPU lacks {', '.join(missing)}")
    a, b = _inputs()
    arrays, any_lane, width = _parse(_run(tmp_path, name, flags, a, b))
    assert width == {"sse2": 8, "avx2": 16, "avx512": 32}[name]
    for key, want in _expected(a, b).items():
        got = arrays[key][:len(a)]
        bad = np.flatnonzero(got != want)
        assert bad.size == 0, (f"{name} {key}: lane {bad[0]} a={a[bad[0]]!r} b={b[bad[0]]!r} "
                               f"got {got[bad[0]]:08x}, want {want[bad[0]]:08x}")
    # FirstLanes(count): lanes [0, count) set, clamped to [0, width]; AnyLane of it.
    first = arrays["first"].reshape(-1, width)
    for row, count in enumerate(range(-1, width + 2)):
        live = min(max(count, 0), width)
        want = np.r_[np.ones(live), np.zeros(width - live)].astype(np.float32).view(np.uint32)
        np.testing.assert_array_equal(first[row], want, err_msg=f"{name} FirstLanes({count})")
        assert any_lane[count] == (1 if live > 0 else 0), f"{name} AnyLane(FirstLanes({count}))"
