#!/usr/bin/env bash
# Replace Pillow with Pillow-SIMD in the environment of the given Python (default: python3).
# Idempotent, and the last step of every set-up (Makefile, Dockerfile): any later `pip install`
# of a package that requires `pillow` silently puts Pillow back, and `aimctl doctor` shows which
# one is imported. If Pillow-SIMD cannot be built, Pillow stays and this says so (exit 0).
# WebP: Pillow-SIMD decodes WebP only when built against libwebp. Without its headers, this
# installs libwebp-dev when it runs as root with apt-get (after apt-get update), else says
# what to install and builds without WebP.
set -u
PY=${1:-python3}
VERSION=${PILLOW_SIMD_VERSION:-12.1.1.post0}

webp_headers() {
    [[ -f /usr/include/webp/decode.h || -f /usr/local/include/webp/decode.h ]] \
        || pkg-config --exists libwebp 2>/dev/null
}
if ! webp_headers; then
    if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null 2>&1; then
        echo "pillow-simd: installing libwebp-dev (WebP support)"
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
            --no-install-recommends libwebp-dev) >/dev/null 2>&1 \
            || echo "pillow-simd: apt-get install libwebp-dev failed" >&2
    fi
    if ! webp_headers; then
        echo "pillow-simd: no libwebp headers: building without WebP (WebP images will be" \
             "rejected). Install libwebp-dev (Debian/Ubuntu), libwebp-devel (Fedora) or" \
             "webp (Homebrew), then run this again." >&2
    fi
fi
has_webp() { "$PY" -c 'from PIL import features; raise SystemExit(not features.check("webp"))' 2>/dev/null; }

active=$("$PY" -c 'import PIL; print(PIL.__version__)' 2>/dev/null || echo none)
if [[ "$active" == *.post* ]] && ! "$PY" -m pip show -q pillow >/dev/null 2>&1; then
    if has_webp || ! webp_headers; then
        echo "pillow-simd: Pillow-SIMD $active already active ($(has_webp && echo with || echo without) WebP)"
        exit 0
    fi
    echo "pillow-simd: Pillow-SIMD $active has no WebP; rebuilding with libwebp"
fi

# Build the wheel before touching Pillow, so that a failed build leaves a working PIL.
wheels=$(mktemp -d)
trap 'rm -rf "$wheels"' EXIT
flags=""
grep -qw avx2 /proc/cpuinfo 2>/dev/null && flags="-mavx2"
# --no-cache-dir: a wheel cached from a build without libwebp would come back without WebP.
if CC="${CC:-cc} $flags" "$PY" -m pip wheel -q --no-deps --no-cache-dir --no-binary pillow-simd \
        -w "$wheels" "pillow-simd==$VERSION" >"$wheels/build.log" 2>&1; then
    "$PY" -m pip uninstall -y -q pillow pillow-simd >/dev/null 2>&1
    "$PY" -m pip install -q --no-deps "$wheels"/*.whl
    echo "pillow-simd: Pillow $active replaced by Pillow-SIMD $("$PY" -c 'import PIL; print(PIL.__version__)')" \
         "($(has_webp && echo with || echo without) WebP)"
else
    echo "pillow-simd: could not build Pillow-SIMD $VERSION (needs a C compiler and libjpeg/zlib headers);" \
         "keeping Pillow $active. Build log tail:" >&2
    tail -5 "$wheels/build.log" >&2
fi
exit 0
