#!/usr/bin/env bash
# Replace Pillow with Pillow-SIMD in the environment of the given Python (default: python3).
# Idempotent, and the last step of every set-up (Makefile, Dockerfile): any later `pip install`
# of a package that requires `pillow` silently puts Pillow back, and `aimctl doctor` shows which
# one is imported. If Pillow-SIMD cannot be built, Pillow stays and this says so (exit 0).
# WebP: Pillow-SIMD decodes WebP only when built against libwebp. Without its headers, this
# installs libwebp-dev when it runs as root with apt-get (after apt-get update), waiting up to
# $AIM_APT_LOCK_TIMEOUT seconds (600) for another apt or dpkg (unattended-upgrades) to release
# its lock; else it says what to install and builds without WebP.
#
#   bash infra/pillow_simd.sh [PY]           the swap
#   bash infra/pillow_simd.sh --check [PY]   only the codec check: a visible warning (exit 0)
#                                            when the imported PIL cannot decode JPEG, PNG or
#                                            WebP; `make setup` ends with it
# Sourcing this file defines its functions without running anything (the tests do).
set -u
VERSION=${PILLOW_SIMD_VERSION:-12.1.1.post0}
LOCK_TIMEOUT=${AIM_APT_LOCK_TIMEOUT:-600}
LOCK_RETRY_S=${AIM_APT_LOCK_RETRY_S:-5}

webp_headers() {
    [[ -f /usr/include/webp/decode.h || -f /usr/local/include/webp/decode.h ]] \
        || pkg-config --exists libwebp 2>/dev/null
}

# apt-get "$@", waiting for the dpkg and package-list locks: apt's own DPkg::Lock::Timeout,
# and a retry while apt still says the lock is held (`apt-get update`'s list lock, older apt).
# On failure, apt's last lines go to stderr.
apt_get_waiting() {
    local deadline=$((SECONDS + LOCK_TIMEOUT)) out said=""
    while true; do
        if out=$(DEBIAN_FRONTEND=noninteractive apt-get -o "DPkg::Lock::Timeout=$LOCK_TIMEOUT" \
                "$@" 2>&1); then
            return 0
        fi
        if grep -qiE "could not get lock|unable to acquire|is another process using it" \
                <<<"$out" && ((SECONDS < deadline)); then
            if [[ -z $said ]]; then
                echo "pillow-simd: another apt or dpkg holds its lock; waiting up to" \
                     "${LOCK_TIMEOUT}s (AIM_APT_LOCK_TIMEOUT)" >&2
                said=1
            fi
            sleep "$LOCK_RETRY_S"
            continue
        fi
        echo "pillow-simd: apt-get $* failed:" >&2
        tail -5 <<<"$out" | sed 's/^/  /' >&2
        return 1
    done
}

install_webp_headers() {
    webp_headers && return 0
    if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null 2>&1; then
        echo "pillow-simd: installing libwebp-dev (WebP support)"
        apt_get_waiting update -qq \
            && apt_get_waiting install -y -qq --no-install-recommends libwebp-dev
    fi
    if ! webp_headers; then
        echo "pillow-simd: no libwebp headers: building without WebP (WebP images will be" \
             "rejected). Install libwebp-dev (Debian/Ubuntu), libwebp-devel (Fedora) or" \
             "webp (Homebrew), then run this again." >&2
        return 1
    fi
}

# The codecs the imported PIL lacks, by name (JPEG, PNG, WebP), one line; empty when none.
missing_codecs() {
    "$1" - <<'PY' 2>/dev/null || echo "JPEG PNG WebP (PIL does not import)"
from PIL import features
wanted = {"JPEG": "jpg", "PNG": "zlib", "WebP": "webp"}
print(" ".join(name for name, feature in wanted.items() if not features.check(feature)))
PY
}

# A warning nobody scrolls past when a codec is missing (exit status 0 either way).
codec_warning() {
    local missing
    missing=$(missing_codecs "$1")
    [[ -z $missing ]] && return 0
    local rule="********************************************************************************"
    {
        echo "$rule"
        echo "WARNING: the PIL of $1 cannot decode: $missing."
        echo "  Images in these formats are rejected at ingest and in training."
        echo "  Install the headers (Debian/Ubuntu: libjpeg-turbo8-dev zlib1g-dev libwebp-dev;"
        echo "  Fedora: libjpeg-turbo-devel zlib-devel libwebp-devel; Homebrew: jpeg-turbo webp),"
        echo "  then run: bash infra/pillow_simd.sh $1"
        echo "$rule"
    } >&2
}

has_webp() { "$PY" -c 'from PIL import features; raise SystemExit(not features.check("webp"))' 2>/dev/null; }

# The folder of this build's cached wheel: one per Pillow-SIMD version, Python, platform, CPU
# flags and WebP (so a wheel built without libwebp never comes back where its headers now are).
# A second set-up on this machine (another clone, each CI run) installs it instead of compiling
# again: the build is about 45 s (81 core-s) of a 2-core machine's set-up. $AIM_WHEEL_CACHE
# moves the cache; deleting it builds again.
wheel_cache() {
    local root=${AIM_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/aim-platform/wheels} tag
    tag=$("$PY" -c 'import sys, sysconfig; print(f"cp{sys.version_info[0]}{sys.version_info[1]}-{sysconfig.get_platform()}")') \
        || return 1
    echo "$root/pillow-simd-$VERSION-$tag-${flags:-plain}-$(webp_headers && echo webp || echo nowebp)"
}

# Whether $1 is a whole wheel (a zip whose members all read back).
whole_wheel() {
    [[ -f $1 ]] && "$PY" -c 'import sys, zipfile; sys.exit(zipfile.ZipFile(sys.argv[1]).testzip() is not None)' "$1" 2>/dev/null
}

swap() {
    install_webp_headers
    active=$("$PY" -c 'import PIL; print(PIL.__version__)' 2>/dev/null || echo none)
    if [[ "$active" == *.post* ]] && ! "$PY" -m pip show -q pillow >/dev/null 2>&1; then
        if has_webp || ! webp_headers; then
            echo "pillow-simd: Pillow-SIMD $active already active ($(has_webp && echo with || echo without) WebP)"
            return 0
        fi
        echo "pillow-simd: Pillow-SIMD $active has no WebP; rebuilding with libwebp"
    fi

    # Build the wheel (or take this machine's cached one) before touching Pillow, so that a
    # failed build leaves a working PIL.
    wheels=$(mktemp -d)
    trap 'rm -rf "$wheels"' EXIT
    flags=""
    grep -qw avx2 /proc/cpuinfo 2>/dev/null && flags="-mavx2"
    cache=$(wheel_cache) || cache=""
    cached=$(ls "$cache"/*.whl 2>/dev/null | head -1)
    # pip's --no-cache-dir: its cache would give back a wheel built without libwebp; ours
    # (wheel_cache) tells the two apart.
    if [[ -n $cache ]] && whole_wheel "$cached"; then
        cp "$cached" "$wheels"/
        how=", a wheel built before on this machine: $cache"
    elif CC="${CC:-cc} $flags" "$PY" -m pip wheel -q --no-deps --no-cache-dir --no-binary pillow-simd \
            -w "$wheels" "pillow-simd==$VERSION" >"$wheels/build.log" 2>&1; then
        how=""
        if [[ -n $cache ]] && mkdir -p "$cache" && cp "$wheels"/*.whl "$cache/.partial" 2>/dev/null; then
            mv "$cache/.partial" "$cache/$(basename "$wheels"/*.whl)"  # whole or absent
        fi
    else
        how=failed
    fi
    if [[ $how != failed ]]; then
        "$PY" -m pip uninstall -y -q pillow pillow-simd >/dev/null 2>&1
        "$PY" -m pip install -q --no-deps "$wheels"/*.whl
        echo "pillow-simd: Pillow $active replaced by Pillow-SIMD $("$PY" -c 'import PIL; print(PIL.__version__)')" \
             "($(has_webp && echo with || echo without) WebP$how)"
    else
        echo "pillow-simd: could not build Pillow-SIMD $VERSION (needs a C compiler and libjpeg/zlib headers);" \
             "keeping Pillow $active. Build log tail:" >&2
        tail -5 "$wheels/build.log" >&2
    fi
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    if [[ ${1:-} == --check ]]; then
        codec_warning "${2:-python3}"
    else
        PY=${1:-python3}
        swap
    fi
    exit 0
fi
