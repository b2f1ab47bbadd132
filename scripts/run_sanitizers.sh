#!/usr/bin/env bash
# Builds the framework-free core + the pybind11 module fused_segloss._core with
# AddressSanitizer and UndefinedBehaviorSanitizer in a separate build directory, then runs
# the oracle checks of _core.stats / _core.logit_grad against tests/numpy_reference.py
# through the instrumented module (scripts/sanitizer_oracle.py; no TensorFlow is imported).
#
#   scripts/run_sanitizers.sh            # build into build-asan/, run the checks
#   FSL_SANITIZE_BUILD_DIR=/tmp/x scripts/run_sanitizers.sh
#
# Exit status: 0 passed, 77 the compiler lacks the sanitizer runtimes (skip), else failed.
# The Python interpreter is not instrumented, so libasan must be the first library loaded:
# it is LD_PRELOADed (with libstdc++, see step 3). Leak detection is off because CPython itself never frees everything.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUILD_DIR=${FSL_SANITIZE_BUILD_DIR:-$ROOT/build-asan}
PKG_DIR=$BUILD_DIR/sanitized_pkg
PYTHON=${PYTHON:-$(command -v python3 || command -v python)}
CXX=${CXX:-g++}
SANITIZE_FLAGS="-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined"

# 1. Does this compiler have the sanitizer runtimes at all?
probe_dir=$(mktemp -d)
trap 'rm -rf "$probe_dir"' EXIT
echo 'int main() { return 0; }' > "$probe_dir/probe.cc"
if ! "$CXX" $SANITIZE_FLAGS "$probe_dir/probe.cc" -o "$probe_dir/probe" 2> "$probe_dir/err" \
    || ! "$probe_dir/probe"; then
  echo "SKIP: $CXX cannot build or run with $SANITIZE_FLAGS:"; cat "$probe_dir/err"
  exit 77
fi
ASAN_LIB=$("$CXX" -print-file-name=libasan.so)
if [[ ! -e "$ASAN_LIB" ]]; then
  echo "SKIP: $CXX has no shared libasan.so to preload into Python"; exit 77
fi

# 2. Configure and build only the _core target (FUSED_SEGLOSS_SANITIZE compiles an
#    instrumented copy of the core for it).
mkdir -p "$BUILD_DIR"
generator=()
if command -v ninja > /dev/null; then generator=(-G Ninja); fi
if [[ -f "$BUILD_DIR/CMakeCache.txt" ]] && ! grep -q "FUSED_SEGLOSS_SANITIZE:BOOL=ON" "$BUILD_DIR/CMakeCache.txt"; then
  echo "refusing to reuse $BUILD_DIR: it is not a sanitizer build"; exit 2
fi
cmake -S "$ROOT" -B "$BUILD_DIR" "${generator[@]}" \
  -DPython3_EXECUTABLE="$PYTHON" \
  -DFUSED_SEGLOSS_SANITIZE=ON -DFUSED_SEGLOSS_CUDA=OFF \
  -DFUSED_SEGLOSS_OUTPUT_DIR="$PKG_DIR" > "$BUILD_DIR/configure.log" 2>&1 \
  || { cat "$BUILD_DIR/configure.log"; echo "cmake configure failed"; exit 1; }
cmake --build "$BUILD_DIR" --target _core -j "${CMAKE_BUILD_PARALLEL_LEVEL:-2}"

SO=$(ls "$PKG_DIR"/_core*.so 2> /dev/null | head -n 1 || true)
if [[ -z "$SO" ]]; then echo "the sanitized _core module was not built in $PKG_DIR"; exit 1; fi
# A module that is not linked against the runtimes would make a clean run meaningless.
if ! readelf -d "$SO" | grep -q "libasan" || ! readelf -d "$SO" | grep -q "libubsan"; then
  echo "$SO is not linked against libasan/libubsan: it is not instrumented"; exit 1
fi
echo "instrumented module: $SO"

# 3. Oracle checks through the instrumented module. libstdc++ is preloaded too: ASan
#    resolves the real __cxa_throw when it starts, and a module that throws (every
#    ValueError from _core is a C++ exception) otherwise aborts in the interceptor.
STDCXX_LIB=$("$CXX" -print-file-name=libstdc++.so)
export LD_PRELOAD="$ASAN_LIB $STDCXX_LIB"
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=0:halt_on_error=1:exitcode=86:${ASAN_OPTIONS:-}"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:exitcode=87:${UBSAN_OPTIONS:-}"
exec "$PYTHON" "$ROOT/scripts/sanitizer_oracle.py" "$PKG_DIR"
