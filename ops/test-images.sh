#!/usr/bin/env bash
# Build the images berthd's integration tests run, without any registry.
#
#   berthd-test/busybox:latest  a busybox-static rootfs (sh, echo, cat, sleep, ...), ~2 MB
#   berthd-test/python:3.11     the host's Debian python3.11 + stdlib + the shared libraries
#                               it links (ldd), the host's bash (bash kernels) and its
#                               libraries, plus busybox for sh; ~60 MB, ~3 s
#
# Both are `docker import`s of a rootfs assembled from host files, so CI needs no network
# access to a registry. Each image carries a label with a recipe version; an image that
# exists with the current recipe is kept, anything else (missing, older recipe, or an
# image of the same name built some other way) is rebuilt.
#
# Run as root on Debian 12 after ops/docker-engine.sh. Uses the private engine by default
# (BERTHD_DOCKER_HOST overrides). Prints the environment line it implies at the end.
set -euo pipefail

export DOCKER_HOST="${BERTHD_DOCKER_HOST:-unix:///run/berthd-ci/docker.sock}"
BUSYBOX_REF=berthd-test/busybox:latest
PYTHON_REF=berthd-test/python:3.11
BUSYBOX_RECIPE=busybox-3
PYTHON_RECIPE=python-4
RECIPE_LABEL=berthd.test-image
DEFAULT_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

log() { printf 'test-images: %s\n' "$*" >&2; }

need_pkgs=()
command -v docker >/dev/null 2>&1 || need_pkgs+=(docker.io)
dpkg -s busybox-static >/dev/null 2>&1 || need_pkgs+=(busybox-static)
[ -x /usr/bin/python3.11 ] || need_pkgs+=(python3.11)
[ -x /bin/bash ] || need_pkgs+=(bash)
if [ "${#need_pkgs[@]}" -gt 0 ]; then
    log "installing ${need_pkgs[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null
fi

if ! docker version >/dev/null 2>&1; then
    log "no Docker engine answers on $DOCKER_HOST; run ops/docker-engine.sh first"
    exit 1
fi

WORK=$(mktemp -d /tmp/berthd-test-images.XXXXXX)
trap 'rm -rf "$WORK"' EXIT

# up_to_date REF RECIPE: the image exists and was built by this recipe.
up_to_date() {
    local got
    got=$(docker image inspect --format "{{ index .Config.Labels \"$RECIPE_LABEL\" }}" "$1" 2>/dev/null) || return 1
    [ "$got" = "$2" ]
}

# base_rootfs DIR: the directory skeleton and a busybox with its applets in /bin.
base_rootfs() {
    local root=$1 applet
    mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,etc,root,proc,sys,dev,tmp,workspace}
    chmod 1777 "$root/tmp"
    chmod 0777 "$root/workspace"
    # /bin/busybox may be a symlink (usrmerge): -L copies the file it points to.
    cp -L /bin/busybox "$root/bin/busybox"
    for applet in $("$root/bin/busybox" --list); do
        [ "$applet" = busybox ] && continue
        [ -e "$root/bin/$applet" ] || ln -s busybox "$root/bin/$applet"
    done
    printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' \
        >"$root/etc/passwd"
    printf 'root:x:0:\nnogroup:x:65534:\n' >"$root/etc/group"
}

# import_rootfs DIR REF RECIPE CMD SMOKE...: tar the rootfs (owned by root) into a scratch
# tag, run SMOKE in it, and only then move REF to it, so a broken build never looks done.
import_rootfs() {
    local root=$1 ref=$2 recipe=$3 cmd=$4 scratch="berthd-test/scratch:$3"
    shift 4
    tar --numeric-owner --owner=0 --group=0 -C "$root" -cf - . |
        docker import \
            --change "LABEL $RECIPE_LABEL=$recipe" \
            --change "ENV PATH=$DEFAULT_PATH" \
            --change "CMD $cmd" \
            - "$scratch" >/dev/null
    if [ "$(docker run --rm --network none "$scratch" "$@")" != ok ]; then
        log "smoke test of $ref failed: $*"
        docker rmi "$scratch" >/dev/null || true
        exit 1
    fi
    local old
    old=$(docker image inspect --format '{{ .Id }}' "$ref" 2>/dev/null || true)
    docker tag "$scratch" "$ref"
    docker rmi "$scratch" >/dev/null
    # The image REF pointed to before is now untagged; drop it unless something uses it.
    if [ -n "$old" ] && [ "$old" != "$(docker image inspect --format '{{ .Id }}' "$ref")" ]; then
        docker rmi "$old" >/dev/null 2>&1 || true
    fi
}

build_busybox() {
    local root="$WORK/busybox"
    base_rootfs "$root"
    import_rootfs "$root" "$BUSYBOX_REF" "$BUSYBOX_RECIPE" '["sh"]' sh -c 'echo ok'
}

build_python() {
    local root="$WORK/python" py=/usr/bin/python3.11 lib f
    base_rootfs "$root"
    cp -L "$py" "$root/usr/bin/python3.11"
    ln -s python3.11 "$root/usr/bin/python3"
    ln -s python3.11 "$root/usr/bin/python"
    mkdir -p "$root/usr/lib"
    # The stdlib without bytecode caches (Python rebuilds what it needs in memory).
    tar -C /usr/lib --exclude=__pycache__ --exclude=python3.11/test -cf - python3.11 |
        tar -C "$root/usr/lib" -xf -
    # bash for bash kernels (a real one, not a busybox applet).
    rm -f "$root/bin/bash"
    cp -L /bin/bash "$root/bin/bash"
    # Shared libraries of the interpreter, of every extension module and of bash, loader included.
    {
        ldd "$py"
        ldd /bin/bash
        for f in /usr/lib/python3.11/lib-dynload/*.so; do ldd "$f"; done
    } | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' | sort -u |
        while read -r lib; do
            cp -L --parents "$lib" "$root"
        done
    import_rootfs "$root" "$PYTHON_REF" "$PYTHON_RECIPE" '["python3"]' \
        python3 -c 'import json, ssl, sqlite3, ctypes, zlib, subprocess
print(subprocess.check_output(["bash", "--noprofile", "--norc", "-c", "echo ok"], text=True).strip())'
}

if up_to_date "$BUSYBOX_REF" "$BUSYBOX_RECIPE"; then
    log "$BUSYBOX_REF up to date"
else
    log "building $BUSYBOX_REF"
    build_busybox
fi

if up_to_date "$PYTHON_REF" "$PYTHON_RECIPE"; then
    log "$PYTHON_REF up to date"
else
    log "building $PYTHON_REF"
    build_python
fi

echo "export DOCKER_HOST=$DOCKER_HOST"
