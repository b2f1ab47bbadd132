"""The framework-free core under AddressSanitizer + UndefinedBehaviorSanitizer.

scripts/run_sanitizers.sh builds fused_segloss._core from an instrumented copy of the core
(CMake option FUSED_SEGLOSS_SANITIZE, separate build directory build-asan/) and runs the
oracle checks of scripts/sanitizer_oracle.py through it against tests/numpy_reference.py.
A first build takes about a minute; later runs rebuild incrementally.
"""
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "run_sanitizers.sh")
SANITIZE_FLAGS = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer",
                  "-fno-sanitize-recover=undefined"]
SKIP_STATUS = 77  # the script's "no sanitizer runtimes" exit status
SANITIZER_REPORTS = ("ERROR: AddressSanitizer", "AddressSanitizer: CHECK failed",
                     "runtime error:", "ERROR: LeakSanitizer", "UndefinedBehaviorSanitizer")


def _compile_and_run(tmp_path, source):
    """Builds a tiny program with the script's flags; skips when the runtimes are missing."""
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        pytest.skip(f"no C++ compiler {cxx!r}")
    src = tmp_path / "probe.cc"
    src.write_text(textwrap.dedent(source))
    exe = tmp_path / "probe"
    build = subprocess.run([cxx, *SANITIZE_FLAGS, "-O1", "-g", str(src), "-o", str(exe)],
                           capture_output=True, text=True)
    if build.returncode != 0:
        pytest.skip(f"{cxx} cannot build with {' '.join(SANITIZE_FLAGS)}: {build.stderr[-500:]}")
    return subprocess.run([str(exe)], capture_output=True, text=True,
                          env={**os.environ, "ASAN_OPTIONS": "detect_leaks=0"})


def test_toolchain_reports_a_heap_overflow(tmp_path):
    # Shows that a clean oracle run means something: these flags do catch a bad access.
    run = _compile_and_run(tmp_path, """
        #include <vector>
        int main(int argc, char**) {
          std::vector<float> v(8);
          float* data = v.data();
          return static_cast<int>(data[7 + argc]);  // one past the end
        }""")
    assert run.returncode != 0
    assert "heap-buffer-overflow" in run.stderr


def test_toolchain_reports_undefined_behaviour(tmp_path):
    run = _compile_and_run(tmp_path, """
        #include <climits>
        int main(int argc, char**) {
          int big = INT_MAX - 1 + argc;  // INT_MAX
          return big + argc;             // signed overflow
        }""")
    assert run.returncode != 0
    assert "runtime error:" in run.stderr


@pytest.mark.slow
def test_core_oracle_checks_pass_under_asan_and_ubsan():
    if shutil.which("cmake") is None:
        pytest.skip("cmake is not installed")
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("LD_PRELOAD", None)
    run = subprocess.run(["bash", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=900)
    output = run.stdout + run.stderr
    if run.returncode == SKIP_STATUS:
        pytest.skip(output.strip().splitlines()[0] if output.strip() else "no sanitizer runtimes")
    found = [report for report in SANITIZER_REPORTS if report in output]
    assert not found, f"sanitizer reported {found}:\n{output[-6000:]}"
    assert run.returncode == 0, f"run_sanitizers.sh exited {run.returncode}:\n{output[-6000:]}"
    assert "SANITIZER ORACLE PASSED" in output, output[-3000:]
