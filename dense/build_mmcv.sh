#!/usr/bin/env bash
# Build mmcv 2.1.0 with its compiled ops (mmcv._ext) against the torch of the current Python (torch 2.14).
#
#   bash dense/build_mmcv.sh                 # build and install into $PYTHON's environment (replaces mmcv-lite)
#   bash dense/build_mmcv.sh --wheel DIR     # only build a wheel into DIR
#
# Two fixes over a plain `pip install mmcv==2.1.0`, both needed with torch 2.14:
#   1. mmcv's setup.py imports pkg_resources (gone from setuptools 81) and torch: build with setuptools<81,
#      wheel and ninja, without build isolation, so the build sees the installed torch;
#   2. torch 2.14's ATen headers need C++20; mmcv's setup.py asks for -std=c++17.
# Environment: PYTHON (default: python), MAX_JOBS (default 2), CFLAGS (default "-g0 -O1": no debug info and light
# optimisation, much faster to compile; the ops are not the bottleneck of a training step).
set -euo pipefail
PYTHON=${PYTHON:-python}
WHEEL_DIR=""
if [ "${1:-}" = "--wheel" ]; then
    WHEEL_DIR=${2:?"--wheel needs a directory"}
elif [ $# -gt 0 ]; then
    echo "usage: bash dense/build_mmcv.sh [--wheel DIR]" >&2
    exit 2
fi
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

"$PYTHON" -m pip install --quiet "setuptools<81" wheel ninja
"$PYTHON" -m pip download --quiet --no-deps --no-binary :all: mmcv==2.1.0 -d "$WORK"
tar -xzf "$WORK"/mmcv-2.1.0.tar.gz -C "$WORK"
SRC="$WORK/mmcv-2.1.0"
if ! grep -q -- "-std=c++17" "$SRC/setup.py"; then
    echo "error: $SRC/setup.py has no -std=c++17 flag to raise; is this mmcv 2.1.0?" >&2
    exit 1
fi
sed -i 's/-std=c++17/-std=c++20/g' "$SRC/setup.py"

export MMCV_WITH_OPS=1 MAX_JOBS=${MAX_JOBS:-2} CFLAGS=${CFLAGS:-"-g0 -O1"}
if [ -n "$WHEEL_DIR" ]; then
    mkdir -p "$WHEEL_DIR"
    "$PYTHON" -m pip wheel --no-build-isolation --no-deps -w "$WHEEL_DIR" "$SRC"
else
    # mmcv-lite and mmcv install the same `mmcv` package: remove the lite one first.
    "$PYTHON" -m pip uninstall --yes mmcv-lite >/dev/null 2>&1 || true
    "$PYTHON" -m pip install --no-build-isolation --no-deps "$SRC"
    "$PYTHON" -c "import mmcv._ext, mmcv; print('mmcv', mmcv.__version__, 'with compiled ops')"
fi
