# The one image every pipeline step runs in: CUDA PyTorch base + dseh and its pinned dependencies.
# Build: scripts/build_image.sh (buildah), or
#   docker build --build-arg BASE_DIGEST="$(skopeo inspect --format '{{.Digest}}' docker://BASE_IMAGE)" -t REGISTRY/dseh:0.1.0 .
# The base is pinned by digest: BASE_DIGEST (sha256:...) has no default, and without it the FROM
# line is not a valid reference, so no build runs on whatever the tag points to that day.
ARG BASE_IMAGE=pytorch/pytorch:2.13.0-cuda12.8-cudnn9-runtime
ARG BASE_DIGEST
FROM ${BASE_IMAGE}@${BASE_DIGEST}
ARG BASE_IMAGE
ARG BASE_DIGEST
LABEL org.opencontainers.image.base.name="${BASE_IMAGE}" \
      org.opencontainers.image.base.digest="${BASE_DIGEST}"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    MPLCONFIGDIR=/tmp/matplotlib \
    NUMBA_CACHE_DIR=/tmp/numba

WORKDIR /opt/dseh

# Dependencies first, from the pins alone, so this layer is reused until pyproject.toml or
# constraints.txt change. torch==2.13.0 is already in the base image (its CUDA build).
COPY pyproject.toml constraints.txt README.md ./
RUN mkdir -p dseh components pipelines \
    && touch dseh/__init__.py components/__init__.py pipelines/__init__.py \
    && python -m pip install --no-cache-dir -c constraints.txt . \
    && python -m pip uninstall -y dseh \
    && rm -rf dseh components pipelines

# The code: the library, the Kubeflow components and the pipeline definition.
COPY dseh ./dseh
COPY components ./components
COPY pipelines ./pipelines
RUN python -m pip install --no-cache-dir --no-deps -c constraints.txt . \
    && useradd --create-home --uid 1000 --shell /bin/bash dseh

USER 1000
WORKDIR /home/dseh
ENTRYPOINT []
CMD ["dseh", "--help"]
