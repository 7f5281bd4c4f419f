#!/usr/bin/env bash
# Build the BotBox images (images/Dockerfile) hermetically.
#
#   images/build.sh [options]            wheelhouse + docker build of the targets
#   images/build.sh wheelhouse           only (re)build images/.build/wheels
#   images/build.sh local-base           only make the debootstrapped base images; prints their names
#
# Options:
#   --base IMAGE        base for the sidecar/demo (default debian:bookworm-slim; when it is neither present
#                       nor pullable, the local debootstrap base is built and used, loudly)
#   --init-base IMAGE   base for iptables-init (default: the same as --base)
#   --local-base        use debootstrapped bases (no registry needed; they already hold python3, and the
#                       init base iptables + nftables, so the build runs with --network none)
#   --tag TAG           tag for botbox/sidecar, botbox/iptables-init, botbox/demo (default: dev)
#   --targets LIST      comma-separated (default: sidecar,iptables-init,demo)
#   --network MODE      `docker build --network` (default: none with local bases, else the default)
#   --python PATH       CPython 3.11 used for the wheelhouse (default /opt/botbox/venv/bin/python);
#                       it must match the image's Python (Debian bookworm: 3.11) and platform
#
# Environment: DOCKER (client binary, default `docker`), BOTBOX_CACHE_DIR (default /var/cache/botbox,
# holds the debootstrap package cache and base tarballs), BOTBOX_DEBIAN_MIRROR (default: the first
# bookworm mirror in /etc/apt/sources.list*, else http://deb.debian.org/debian).
set -euo pipefail
shopt -s inherit_errexit

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
DOCKER="${DOCKER:-docker}"
CACHE_DIR="${BOTBOX_CACHE_DIR:-/var/cache/botbox}"
PY="/opt/botbox/venv/bin/python"
BASE=""
INIT_BASE=""
LOCAL_BASE=0
TAG="dev"
TARGETS="sidecar,iptables-init,demo"
NETWORK=""
DEFAULT_BASE="debian:bookworm-slim"
# Bump when the base recipe changes, so cached base images/tarballs are rebuilt.
BASE_RECIPE=3
SUITE=bookworm
PKGS_PYTHON="python3"
PKGS_NETFILTER="python3,iptables,nftables"

log() { printf '\033[1m[images]\033[0m %s\n' "$*" >&2; }
die() { printf '\033[1;31m[images] error:\033[0m %s\n' "$*" >&2; exit 1; }

# ------------------------------------------------------------------------------------------------ wheels
wheelhouse() {
    local out="$here/.build/wheels" stamp want tmp
    "$PY" - <<'EOF' || die "$PY is not CPython 3.11 on Linux; the images run Debian bookworm's Python 3.11 (use --python)"
import platform, sys
sys.exit(0 if sys.version_info[:2] == (3, 11) and platform.system() == "Linux"
         and platform.python_implementation() == "CPython" else 1)
EOF
    want="$( (cat "$root/pyproject.toml"; "$PY" -c 'import platform,sys; print(sys.version, platform.machine())') \
             | sha256sum | cut -d' ' -f1)"
    stamp="$out/.stamp"
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
        log "wheelhouse up to date ($out)"
        return
    fi
    log "building wheelhouse with $PY"
    mkdir -p "$here/.build"
    tmp="$(mktemp -d "$here/.build/wheels.tmp.XXXXXX")"
    trap 'rm -rf "$tmp"' RETURN
    "$PY" - "$root/pyproject.toml" > "$tmp/requirements.in" <<'EOF'
import sys, tomllib
with open(sys.argv[1], "rb") as f:
    print("\n".join(tomllib.load(f)["project"]["dependencies"]))
EOF
    # pip/setuptools/wheel: pip runs from its wheel inside the image; setuptools+wheel build botbox there.
    if ! "$PY" -m pip wheel -q --disable-pip-version-check --wheel-dir "$tmp" \
            -r "$tmp/requirements.in" pip "setuptools>=68" wheel > "$tmp.log" 2>&1; then
        cat "$tmp.log" >&2; rm -f "$tmp.log"; die "pip wheel failed"
    fi
    rm -f "$tmp.log"
    # Hash-pinned lock of exactly these files: the image installs with --require-hashes.
    "$PY" - "$tmp" > "$tmp/requirements.lock" <<'EOF'
import hashlib, pathlib, sys
d = pathlib.Path(sys.argv[1])
for whl in sorted(d.glob("*.whl")):
    name, version = whl.name.split("-")[:2]
    if name.lower() in {"pip", "setuptools", "wheel"}:
        continue
    digest = hashlib.sha256(whl.read_bytes()).hexdigest()
    print(f"{name}=={version} --hash=sha256:{digest}")
EOF
    echo "$want" > "$tmp/.stamp"
    rm -rf "$out"
    mv "$tmp" "$out"
    trap - RETURN
    log "wheelhouse: $(find "$out" -name '*.whl' | wc -l) wheels, $(du -sh "$out" | cut -f1)"
}

# -------------------------------------------------------------------------------------------- base image
debian_mirror() {
    if [ -n "${BOTBOX_DEBIAN_MIRROR:-}" ]; then echo "$BOTBOX_DEBIAN_MIRROR"; return; fi
    local m
    m="$(
        { grep -hs -E '^URIs:' /etc/apt/sources.list.d/*.sources /dev/null | awk '{print $2}';
          grep -hs -E '^deb[[:space:]]' /etc/apt/sources.list /etc/apt/sources.list.d/*.list /dev/null \
            | awk '$3 ~ /^bookworm$/ {print $2}'; } \
        | grep -E '/debian/?$' | head -n1
    )" || true
    echo "${m:-http://deb.debian.org/debian}"
}

# local_base VARIANT PACKAGES -> prints the image name; builds it only when missing
local_base() {
    local variant="$1" pkgs="$2" mirror key image tarball rootfs
    mirror="$(debian_mirror)"
    key="$(printf '%s|%s|%s|%s|%s' "$BASE_RECIPE" "$SUITE" "$variant" "$pkgs" "$mirror" \
           | sha256sum | cut -c1-12)"
    image="botbox-local/${SUITE}-${variant}:${key}"
    if "$DOCKER" image inspect "$image" >/dev/null 2>&1; then
        log "base image $image present (cached)"
        echo "$image"; return
    fi
    mkdir -p "$CACHE_DIR/base" "$CACHE_DIR/debootstrap-debs"
    tarball="$CACHE_DIR/base/${SUITE}-${variant}-${key}.tar"
    (
        flock 9
        if [ ! -s "$tarball" ]; then
            command -v debootstrap >/dev/null || die "debootstrap not installed (apt-get install debootstrap)"
            [ "$(id -u)" = 0 ] || die "debootstrap needs root"
            rootfs="$(mktemp -d "$CACHE_DIR/base/rootfs.XXXXXX")"
            trap 'rm -rf --one-file-system "$rootfs"' EXIT
            log "debootstrap --variant=minbase --include=$pkgs $SUITE from $mirror (cached in $CACHE_DIR)"
            debootstrap --variant=minbase --include="$pkgs" --cache-dir="$CACHE_DIR/debootstrap-debs" \
                "$SUITE" "$rootfs" "$mirror" > "$CACHE_DIR/base/debootstrap-${variant}.log" 2>&1 \
                || die "debootstrap failed, see $CACHE_DIR/base/debootstrap-${variant}.log"
            # Slim like debian:*-slim: no package caches/lists, docs, man pages, locales.
            rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/cache/apt/*.bin \
                   "$rootfs"/var/lib/apt/lists/* "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* \
                   "$rootfs"/usr/share/info/* "$rootfs"/usr/share/locale/* "$rootfs"/var/log/*.log \
                   "$rootfs"/var/cache/debconf/*-old "$rootfs"/tmp/* "$rootfs"/root/.cache
            find "$rootfs"/usr/lib/python3* -name __pycache__ -prune -exec rm -rf {} + 2>/dev/null || true
            printf 'path-exclude /usr/share/doc/*\npath-exclude /usr/share/man/*\npath-exclude /usr/share/locale/*\n' \
                > "$rootfs/etc/dpkg/dpkg.cfg.d/botbox-slim"
            echo "deb $mirror $SUITE main" > "$rootfs/etc/apt/sources.list"
            : > "$rootfs/etc/hostname"
            tar --numeric-owner -C "$rootfs" -cf "$tarball.tmp" .
            mv "$tarball.tmp" "$tarball"
        fi
    ) 9> "$CACHE_DIR/base/.lock"
    log "docker import $tarball -> $image"
    "$DOCKER" import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' \
        --change 'CMD ["/bin/bash"]' \
        --message "botbox local base: debootstrap --variant=minbase --include=$pkgs $SUITE" \
        "$tarball" "$image" >/dev/null
    echo "$image"
}

default_base_available() {
    if "$DOCKER" image inspect "$DEFAULT_BASE" >/dev/null 2>&1; then return 0; fi
    log "trying: docker pull $DEFAULT_BASE"
    timeout 120 "$DOCKER" pull -q "$DEFAULT_BASE" >/dev/null 2>&1
}

# ------------------------------------------------------------------------------------------------- build
build_images() {
    if [ "$LOCAL_BASE" = 0 ] && [ -z "$BASE" ]; then
        if default_base_available; then
            BASE="$DEFAULT_BASE"
        else
            log "WARNING: $DEFAULT_BASE is neither present nor pullable (no registry reachable);"
            log "WARNING: building local debootstrap base images instead (--local-base)"
            LOCAL_BASE=1
        fi
    fi
    if [ "$LOCAL_BASE" = 1 ]; then
        [ -n "$BASE" ] || BASE="$(local_base python "$PKGS_PYTHON")"
        [ -n "$INIT_BASE" ] || INIT_BASE="$(local_base netfilter "$PKGS_NETFILTER")"
        [ -n "$NETWORK" ] || NETWORK=none
    fi
    [ -n "$INIT_BASE" ] || INIT_BASE="$BASE"
    wheelhouse
    local net_args=() t start
    [ -z "$NETWORK" ] || net_args=(--network "$NETWORK")
    IFS=',' read -r -a targets <<< "$TARGETS"
    for t in "${targets[@]}"; do
        case "$t" in sidecar|iptables-init|demo) ;; *) die "unknown target: $t" ;; esac
        start=$SECONDS
        log "docker build --target $t (base $BASE, init base $INIT_BASE) -> botbox/$t:$TAG"
        "$DOCKER" build -q -f "$here/Dockerfile" --target "$t" "${net_args[@]}" \
            --build-arg "BASE_IMAGE=$BASE" --build-arg "INIT_BASE_IMAGE=$INIT_BASE" \
            --label "org.opencontainers.image.title=botbox-$t" \
            --label "org.opencontainers.image.version=$TAG" \
            -t "botbox/$t:$TAG" "$root" >/dev/null
        log "built botbox/$t:$TAG in $((SECONDS - start)) s," \
            "$("$DOCKER" image inspect -f '{{.Size}}' "botbox/$t:$TAG" | awk '{printf "%.0f MB", $1/1e6}')"
    done
}

cmd="build"
while [ "$#" -gt 0 ]; do
    case "$1" in
        wheelhouse|local-base|build) cmd="$1" ;;
        --base) BASE="${2:?--base needs an image}"; shift ;;
        --init-base) INIT_BASE="${2:?--init-base needs an image}"; shift ;;
        --local-base) LOCAL_BASE=1 ;;
        --tag) TAG="${2:?--tag needs a value}"; shift ;;
        --targets) TARGETS="${2:?--targets needs a list}"; shift ;;
        --network) NETWORK="${2:?--network needs a mode}"; shift ;;
        --python) PY="${2:?--python needs a path}"; shift ;;
        -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
        *) die "unknown argument: $1 (see --help)" ;;
    esac
    shift
done

case "$cmd" in
    wheelhouse) wheelhouse ;;
    local-base) local_base python "$PKGS_PYTHON"; local_base netfilter "$PKGS_NETFILTER" ;;
    build) build_images ;;
esac
