#!/usr/bin/env bash
# Builds the repo's Dockerfile on a host that reaches only package registries (no container registry,
# no GitHub, no PyTorch index), as root: a Debian base made by debootstrap, CPU torch from the host's
# local wheel folder, no sd-scripts. The build's last steps run the embedded default's dry run.
#   bash scripts/build_image.sh    # env MIRROR, ROOTFS, IMAGE, WHEELS_DIR, CA_BUNDLE, TORCH_VERSION override the defaults
set -euo pipefail
cd "$(dirname "$0")/.."

# The host's own release, so the image's python3 matches the cp3XX tag of the host's wheels.
SUITE=$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")
MIRROR=${MIRROR:-http://deb.debian.org/debian}
ROOTFS=${ROOTFS:-/var/tmp/flux-lora-rootfs-$SUITE}
BASE_IMAGE=flux-lora-base:debian
IMAGE=${IMAGE:-flux-lora:local}
WHEELS_DIR=${WHEELS_DIR:-/opt/wheels}
# The host's pip trusts this bundle (pip config list: global.cert), which holds the CA of the TLS proxy
# in front of the registries; Debian's stock bundle in the image does not.
CA_BUNDLE=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
TORCH_VERSION=${TORCH_VERSION:-2.13.0+cpu}

step() { echo "== $(date +%T) $*"; }
t0=$SECONDS

if ! command -v podman >/dev/null || ! command -v debootstrap >/dev/null; then
    step "installing podman and debootstrap"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman debootstrap >/dev/null
fi
step "$(podman --version), debootstrap $(dpkg-query -W -f '${Version}' debootstrap), host $SUITE"

# No torch in the wheel folder means pip would fetch PyPI's CUDA build (several GB): stop instead.
if ! compgen -G "$WHEELS_DIR/torch-${TORCH_VERSION}-*.whl" >/dev/null; then
    echo "no torch-${TORCH_VERSION} wheel in $WHEELS_DIR (set WHEELS_DIR / TORCH_VERSION)" >&2
    exit 1
fi

# debootstrap takes minutes, so a finished root filesystem is reused (delete ROOTFS to rebuild it).
if [ ! -x "$ROOTFS/usr/bin/apt-get" ]; then
    step "debootstrap --variant=minbase $SUITE into $ROOTFS"
    rm -rf "$ROOTFS"
    debootstrap --variant=minbase "$SUITE" "$ROOTFS" "$MIRROR" >"$ROOTFS.log" 2>&1 \
        || { tail -20 "$ROOTFS.log" >&2; exit 1; }
    rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/*
    podman rmi -f "$BASE_IMAGE" >/dev/null 2>&1 || true
else
    step "reusing $ROOTFS"
fi
# Each import makes a new image id, which would invalidate every cached layer: import only when missing.
if ! podman image exists "$BASE_IMAGE"; then
    step "podman import -> $BASE_IMAGE"
    tar -C "$ROOTFS" -c . | podman import - "$BASE_IMAGE" >/dev/null
fi

# chroot isolation: `podman run` fails on this host (crun: setrlimit RLIMIT_NOFILE: Operation not permitted),
# but builds work this way.
# The wheel folder and CA bundle are bound in for RUN steps only, so the 190 MB torch wheel stays out of
# the context and the layers; torch's own dependencies come from PyPI, as does everything else.
step "podman build -> $IMAGE"
podman build --isolation=chroot \
    -v "$WHEELS_DIR:/host/wheels:ro" -v "$CA_BUNDLE:/host/ca-certificates.crt:ro" \
    --build-arg BASE="$BASE_IMAGE" \
    --build-arg TORCH_VERSION="$TORCH_VERSION" \
    --build-arg TORCH_INDEX=https://pypi.org/simple \
    --build-arg PIP_FIND_LINKS=/host/wheels \
    --build-arg PIP_CERT=/host/ca-certificates.crt \
    --build-arg SD_SCRIPTS=none \
    -t "$IMAGE" .

step "done in $((SECONDS - t0)) s"
podman images --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep -E "^(localhost/)?(${BASE_IMAGE}|${IMAGE})\b"
