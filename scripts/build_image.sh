#!/usr/bin/env bash
# Build the project image with buildah (no Docker engine needed) and smoke-test it.
#
#   scripts/build_image.sh                      # on the default CUDA PyTorch base (pulls it)
#   scripts/build_image.sh --local-base         # on a local Debian base made with debootstrap,
#                                               # for machines that cannot pull images
#
# The base is pinned by digest: BASE_DIGEST (sha256:...) if set, else what `skopeo inspect` says the
# tag BASE_IMAGE points to now (--local-base: the local image's digest). With neither, no build.
# The smoke test runs `dseh --help` and imports the Kubeflow components inside the image.
# Needs: buildah and skopeo (apt-get install buildah skopeo podman runc), debootstrap for --local-base; root.
set -euo pipefail
cd "$(dirname "$0")/.."
TAG=${TAG:-dseh:dev}
WORK=${WORK:-/var/tmp/dseh-image}
BASE_IMAGE=${BASE_IMAGE:-$(sed -n 's/^ARG BASE_IMAGE=//p' Dockerfile)}
args=()
if [ "${1:-}" != "--local-base" ]; then
  digest=${BASE_DIGEST:-$(skopeo inspect --format '{{.Digest}}' "docker://$BASE_IMAGE" 2>/dev/null || true)}
  if [ -z "$digest" ]; then
    echo "build_image.sh: cannot tell the digest of $BASE_IMAGE (skopeo missing or no registry reachable)." >&2
    echo "  Pin it: BASE_DIGEST=\$(skopeo inspect --format '{{.Digest}}' docker://$BASE_IMAGE) on a machine" >&2
    echo "  that reaches the registry, then BASE_DIGEST=sha256:... scripts/build_image.sh; or use --local-base." >&2
    exit 1
  fi
  args+=(--build-arg "BASE_IMAGE=$BASE_IMAGE" --build-arg "BASE_DIGEST=$digest")
  echo "--- base $BASE_IMAGE@$digest"
fi
if [ "${1:-}" = "--local-base" ]; then
  base=localhost/dseh-base:bookworm
  if ! buildah images --format '{{.Name}}:{{.Tag}}' | grep -qx "$base"; then
    # A minimal Debian with Python and the CPU build of the pinned torch, standing in for the
    # CUDA PyTorch image. The host's CA bundle goes in so pip can reach the package index.
    rootfs=$WORK/rootfs
    rm -rf "$rootfs" && mkdir -p "$rootfs"
    debootstrap --variant=minbase --include=python3,python3-pip,python3-venv,ca-certificates bookworm "$rootfs" >"$WORK.debootstrap.log"
    cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
    ln -sf /usr/bin/python3 "$rootfs/usr/local/bin/python"
    wheel=$(ls /opt/wheels/torch-2.13.0*cp311*.whl 2>/dev/null | head -1 || true)
    if [ -n "$wheel" ]; then
      cp "$wheel" "$rootfs/tmp/"
      chroot "$rootfs" python3 -m pip install -q --break-system-packages --cert /etc/ssl/certs/ca-certificates.crt "/tmp/$(basename "$wheel")"
      rm "$rootfs/tmp/$(basename "$wheel")"
    fi
    tar -C "$rootfs" -c . | podman import \
      --change "ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt" \
      --change "ENV PIP_BREAK_SYSTEM_PACKAGES=1" - "$base" >/dev/null
  fi
  digest=$(podman image inspect --format '{{.Digest}}' "$base")
  args+=(--build-arg "BASE_IMAGE=$base" --build-arg "BASE_DIGEST=$digest")
  echo "--- base $base@$digest"
fi
buildah bud --isolation chroot --layers -t "$TAG" "${args[@]}" .
ctr=$(buildah from "$TAG")
trap 'buildah rm "$ctr" >/dev/null' EXIT
echo "--- dseh --help inside $TAG"
buildah run --isolation chroot "$ctr" -- dseh --help
echo "--- import the Kubeflow components inside $TAG"
buildah run --isolation chroot "$ctr" -- python -c "import components.dseh_components as c, pipelines.dseh_pipeline as p; print('components:', ', '.join(n for n in ('prepare', 'train_labnet', 'train_imgnet', 'evaluate', 'promote', 'map_table') if hasattr(c, n)))"
echo "--- user inside $TAG"
buildah run --isolation chroot "$ctr" -- id
