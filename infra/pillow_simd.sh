#!/usr/bin/env bash
# Replace Pillow with Pillow-SIMD in the environment of the given Python (default: python3).
# Idempotent, and the last step of every set-up (Makefile, Dockerfile): any later `pip install`
# of a package that requires `pillow` silently puts Pillow back, and `aimctl doctor` shows which
# one is imported. If Pillow-SIMD cannot be built, Pillow stays and this says so (exit 0).
set -u
PY=${1:-python3}
VERSION=${PILLOW_SIMD_VERSION:-12.1.1.post0}

active=$("$PY" -c 'import PIL; print(PIL.__version__)' 2>/dev/null || echo none)
if [[ "$active" == *.post* ]] && ! "$PY" -m pip show -q pillow >/dev/null 2>&1; then
    echo "pillow-simd: Pillow-SIMD $active already active"
    exit 0
fi

# Build the wheel before touching Pillow, so that a failed build leaves a working PIL.
wheels=$(mktemp -d)
trap 'rm -rf "$wheels"' EXIT
flags=""
grep -qw avx2 /proc/cpuinfo 2>/dev/null && flags="-mavx2"
if CC="${CC:-cc} $flags" "$PY" -m pip wheel -q --no-deps --no-binary pillow-simd \
        -w "$wheels" "pillow-simd==$VERSION" >"$wheels/build.log" 2>&1; then
    "$PY" -m pip uninstall -y -q pillow pillow-simd >/dev/null 2>&1
    "$PY" -m pip install -q --no-deps "$wheels"/*.whl
    echo "pillow-simd: Pillow $active replaced by Pillow-SIMD $("$PY" -c 'import PIL; print(PIL.__version__)')"
else
    echo "pillow-simd: could not build Pillow-SIMD $VERSION (needs a C compiler and libjpeg/zlib headers);" \
         "keeping Pillow $active. Build log tail:" >&2
    tail -5 "$wheels/build.log" >&2
fi
exit 0
