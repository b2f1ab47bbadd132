"""benchmarks/native/kernel_bench.cc builds and its check of the kernels' statistics passes.

The tool times the CPU kernels alone (one thread, in cache); it is not part of the package,
so nothing else builds it and it would rot unseen. Built here with -O0 and only the sources
it needs (about 30 s on 2 cores; -O3 is what the README's command uses), run on an odd
number of positions so that both layouts end rows with partial vectors, and read back:
every case must report finite positive times and "ok", i.e. its forward statistics agree
with float64 sums of the per-element formula, for each layout and dtype it times.
"""
import math
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE = os.path.join(ROOT, "benchmarks", "native", "kernel_bench.cc")
CORE = os.path.join(ROOT, "csrc", "core")
CASES = ["channels_last f32 f32", "channels_first f32 f32", "channels_last f32 uint8",
         "channels_last bf16 uint8"]


@pytest.fixture(scope="module")
def kernel_bench(tmp_path_factory):
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        pytest.skip(f"no C++ compiler {cxx!r}")
    exe = tmp_path_factory.mktemp("kernel_bench") / "kernel_bench"
    sources = [SOURCE, os.path.join(CORE, "segloss_cpu.cc"), os.path.join(CORE, "memory_advice.cc")]
    build = subprocess.run([cxx, "-std=c++17", "-O0", "-march=native", "-fno-trapping-math",
                            "-I", CORE, *sources, "-o", str(exe)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-2000:]
    return str(exe)


def _rows(stdout):
    rows = {}
    for line in stdout.splitlines():
        for name in CASES:
            if line.startswith(name + " "):
                rows[name] = line[len(name):].split()
    return rows


def test_every_case_is_timed_and_checked(kernel_bench):
    run = subprocess.run([kernel_bench, "515", "3"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "vector multiply-adds/s" in run.stdout
    rows = _rows(run.stdout)
    assert sorted(rows) == sorted(CASES), run.stdout
    for name, fields in rows.items():
        fwd_ns, grad_ns, fwd_slots, grad_slots, check = fields
        for value in (fwd_ns, grad_ns, fwd_slots, grad_slots):
            assert math.isfinite(float(value)) and float(value) > 0, (name, fields)
        assert check == "ok", (name, fields)


def test_bad_arguments_are_refused(kernel_bench):
    run = subprocess.run([kernel_bench, "0"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert "usage" in run.stderr
