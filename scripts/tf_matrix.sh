#!/usr/bin/env bash
# scripts/tf_matrix.sh [VERSIONS...]   (default: 2.16 2.17 2.18 2.19 2.20 2.21)
#
# Which TensorFlow versions does fused_segloss build and run with? For each TF minor version:
# a venv ($TF_MATRIX_DIR/venv-2.X, default dir /tmp/tf_matrix, reused when present) gets
# tensorflow==2.X.* + numpy + the build tools; a copy of this repo's working tree (tracked and
# untracked-but-not-ignored files, uncommitted changes included; no build outputs) is built and
# installed non-editably with FUSED_SEGLOSS_CUDA=OFF, and scripts/tf_smoke.py runs from outside
# the copy. Prints a Markdown table; the full output of each version is in $TF_MATRIX_DIR/2.X.log.
# Exit status 1 if any version failed to build or its smoke check did not pass fully.
#
# NOT part of CI: a manual compatibility check (downloads ~500 MB per TF version, builds each).
# Env: TF_MATRIX_DIR, PYTHON (default python3), TF_MATRIX_REF=<git ref> to test a commit
# instead of the working tree, CMAKE_BUILD_PARALLEL_LEVEL.
#
# Keras: no pin. pip installs the newest Keras 3 that each TF accepts (TF 2.16 asks keras>=3.0,
# 2.21 keras>=3.12); Keras 3.15.1 passed the smoke check with every TF from 2.16 to 2.21.
# To try another one for one TF version: KERAS_PIN_2_16="keras==3.5.*" scripts/tf_matrix.sh 2.16
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
DIR=${TF_MATRIX_DIR:-/tmp/tf_matrix}
PY=${PYTHON:-python3}
[ $# -gt 0 ] && VERSIONS=("$@") || VERSIONS=(2.16 2.17 2.18 2.19 2.20 2.21)
mkdir -p "$DIR" && DIR=$(cd "$DIR" && pwd)
start=$(date +%s)

# One snapshot of the sources for every version, so all of them test the same code.
SNAP=$(mktemp "$DIR/snapshot.XXXXXX.tar")
if [ -n "${TF_MATRIX_REF:-}" ]; then
  git -C "$REPO" archive --format=tar "$TF_MATRIX_REF" > "$SNAP" || exit 1
  SRC_DESC="$TF_MATRIX_REF ($(git -C "$REPO" rev-parse --short "$TF_MATRIX_REF"))"
else
  git -C "$REPO" ls-files -z -co --exclude-standard |
    tar -C "$REPO" --null -T - --ignore-failed-read -cf "$SNAP" 2>/dev/null
  SRC_DESC="working tree of $REPO at $(git -C "$REPO" rev-parse --short HEAD)"
  [ -n "$(git -C "$REPO" status --porcelain)" ] && SRC_DESC+=" + uncommitted changes"
fi
trap 'rm -f "$SNAP"' EXIT

first_error() {  # FILE REGEX...: the first line matching the first REGEX that matches at all
  local file=$1 re line; shift
  for re in "$@"; do line=$(grep -m1 -E "$re" "$file" | sed 's/^[[:space:]]*//' | cut -c1-200); [ -n "$line" ] && break; done
  echo "${line:-failed (see log)}" | tr '|' '/'
}

summary() {  # WORD FILE: "WORD in check1,check2: the first one's reason", else the last exception
  local checks; checks=$(grep -oE "^$1 +[^:]+" "$2" | awk '{print $2}' | paste -sd, -)
  [ -z "$checks" ] && { grep -E '^[A-Za-z_.]*(Error|Exception)\b' "$2" | tail -1 | cut -c1-200; return; }
  echo "$1 in $checks: $(grep -m1 -E "^$1 " "$2" | cut -d: -f2- | cut -c2-200)" | tr '|' '/'
}

{ # (one compound command: bash reads it whole, so editing this file mid-run is safe)
rows=() failed=0
for v in "${VERSIONS[@]}"; do
  venv=$DIR/venv-$v log=$DIR/$v.log step=$DIR/$v.step build=no smoke=no tfv=$v keras=- note=
  echo "=== TF $v: $(date)  [$SRC_DESC]" | tee "$log"
  pin_var=KERAS_PIN_${v//./_}
  (   { [ -x "$venv/bin/python" ] || "$PY" -m venv "$venv"; } &&
      "$venv/bin/pip" install --disable-pip-version-check "tensorflow==$v.*" numpy pybind11 \
        cmake ninja setuptools wheel ${!pin_var:+"${!pin_var}"}
  ) >> "$log" 2>&1
  if [ $? -ne 0 ]; then
    note="pip install: $(first_error "$log" '^ERROR' 'error')"
  else
    versions=$("$venv/bin/python" -c 'import importlib.metadata as m
print(m.version("tensorflow"), m.version("keras"))' 2>/dev/null) && tfv=${versions% *} keras=${versions#* }
    src=$(mktemp -d "$DIR/src-$v.XXXXXX") && tar -C "$src" -xf "$SNAP"
    "$venv/bin/pip" uninstall -y fused_segloss >> "$log" 2>&1  # never smoke-test a stale build
    echo "--- build" >> "$log"
    (cd "$src" && FUSED_SEGLOSS_CUDA=OFF nice -n 10 "$venv/bin/pip" install -v \
       --disable-pip-version-check --no-build-isolation --no-deps .) > "$step" 2>&1
    rc=$?; cat "$step" >> "$log"
    if [ $rc -eq 0 ]; then
      build=yes
      echo "--- smoke" >> "$log"
      (cd "$DIR" && env -u PYTHONPATH PYTHONNOUSERSITE=1 "$venv/bin/python" "$REPO/scripts/tf_smoke.py") \
        > "$step" 2>&1
      rc=$?; cat "$step" >> "$log"
      case $rc in  # tf_smoke.py: 0 all ok, 3 only fallbacks, else failures
        0) smoke=yes note="all checks ok" ;;
        3) smoke=fallback note=$(summary FALLBACK "$step") ;;
        *) note=$(summary FAIL "$step"); note=${note:-"smoke exited $rc (see log)"} ;;
      esac
    else
      note="build: $(first_error "$step" ': (fatal )?error:' 'CMake Error' 'FAILED' '[Ee]rror')"; note=${note//"$src/"/}
    fi
    rm -rf "$src" "$step"
  fi
  [ "$smoke" = yes ] || failed=1
  rows+=("| $tfv | $keras | $build | $smoke | $note |")
  echo "=== TF $v: build=$build smoke=$smoke $note" | tee -a "$log"
done

echo
echo "Sources: $SRC_DESC; $(( ($(date +%s) - start) / 60 )) min; logs in $DIR/<version>.log"
echo
echo "| TF version | Keras version | build | smoke | note |"
echo "|---|---|---|---|---|"
printf '%s\n' "${rows[@]}"
exit $failed
}
